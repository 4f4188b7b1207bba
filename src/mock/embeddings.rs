//! `POST /v1/embeddings`.

use axum::response::Response;
use base64::Engine as _;
use serde_json::{Value, json};

use super::*;

pub(super) fn embeddings(call: &Call) -> Result<Response, ApiError> {
    let input = pieces(call.body.get("input"), "input")?;
    if call.knobs.inband_error {
        return Ok(json_response(&inband_error(), call.knobs));
    }
    let base64 = match call.body.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(format)) if format == "float" => false,
        Some(Value::String(format)) if format == "base64" => true,
        Some(_) => {
            return Err(ApiError::invalid_value(
                "encoding_format",
                "'float' or 'base64'",
            ));
        }
    };
    let data: Vec<Value> = input
        .iter()
        .enumerate()
        .map(|(index, piece)| {
            let seed = match piece {
                Piece::Text(text) => fnv1a(text.as_bytes()),
                Piece::Tokens(ids) => {
                    let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
                    fnv1a(&bytes)
                }
            };
            let vector = embedding(seed);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let mut body = json!({"object": "list", "data": data, "model": call.model});
    if !call.knobs.no_usage {
        let tokens: u64 = input.iter().map(Piece::tokens).sum();
        body["usage"] = json!({"prompt_tokens": tokens, "total_tokens": tokens});
    }
    Ok(json_response(&body, call.knobs))
}

/// Eight numbers in [-1, 1], a pure function of `seed`.
#[expect(
    clippy::float_arithmetic,
    reason = "embedding components are plain numbers, not money; k / 65536 is exact in f32"
)]
pub(super) fn embedding(seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..EMBEDDING_DIMENSIONS)
        .map(|_| {
            // The modulus keeps the value within 17 bits, so both casts are exact.
            let k = (splitmix64(&mut state) % 131_073) as i32 - 65_536;
            k as f32 / 65_536.0
        })
        .collect()
}
