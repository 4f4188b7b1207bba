//! Verification keys from PEM files and JWK sets, each bound to one algorithm and checked
//! for strength as it is loaded.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey};

use super::*;

pub(super) async fn load_pem_file(path: &Path) -> Result<VerifyKey, String> {
    let pem = tokio::fs::read(path)
        .await
        .map_err(|e| format!("cannot read: {e}"))?;
    key_from_pem(&pem)
}

pub(super) fn key_from_pem(pem: &[u8]) -> Result<VerifyKey, String> {
    let text = std::str::from_utf8(pem).map_err(|_| "not a PEM file".to_owned())?;
    let label = pem_label(text).ok_or_else(|| "not a PEM file (no BEGIN line)".to_owned())?;
    if label.contains("PRIVATE") {
        return Err("holds a private key; configure its public key instead \
                    (`openssl pkey -in key.pem -pubout`)"
            .to_owned());
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        check_rsa_key(&key)?;
        return Ok(VerifyKey {
            alg: Algorithm::RS256,
            kid: None,
            key,
        });
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        check_es256_key(&key)?;
        return Ok(VerifyKey {
            alg: Algorithm::ES256,
            kid: None,
            key,
        });
    }
    Err("expected an RSA or EC P-256 public key".to_owned())
}

pub(super) fn pem_label(text: &str) -> Option<&str> {
    const BEGIN: &str = "-----BEGIN ";
    let start = text.find(BEGIN)? + BEGIN.len();
    let rest = &text[start..];
    Some(&rest[..rest.find("-----")?])
}

pub(super) fn check_rsa_key(key: &DecodingKey) -> Result<(), String> {
    // Extracting the public components parses the key, which jsonwebtoken otherwise only does
    // when the first token arrives.
    let jwk = Jwk::from_decoding_key(key, None).map_err(|_| "not a valid RSA public key")?;
    let AlgorithmParameters::RSA(params) = &jwk.algorithm else {
        return Err("not an RSA public key".to_owned());
    };
    let modulus = URL_SAFE_NO_PAD
        .decode(&params.n)
        .map_err(|_| "invalid RSA modulus")?;
    let exponent = URL_SAFE_NO_PAD
        .decode(&params.e)
        .map_err(|_| "invalid RSA exponent")?;
    if significant_bits(&exponent) == 0 {
        return Err("invalid RSA exponent".to_owned());
    }
    let bits = significant_bits(&modulus);
    if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
        return Err(format!(
            "RSA key is {bits} bits; {MIN_RSA_BITS} to {MAX_RSA_BITS} bits are supported"
        ));
    }
    Ok(())
}

pub(super) fn significant_bits(big_endian: &[u8]) -> usize {
    let start = big_endian
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(big_endian.len());
    match big_endian[start..].first() {
        None => 0,
        Some(first) => (big_endian.len() - start - 1) * 8 + (8 - first.leading_zeros() as usize),
    }
}

pub(super) fn check_es256_key(key: &DecodingKey) -> Result<(), String> {
    // Building an ES256 verifier parses the point; the empty signature then simply fails.
    jsonwebtoken::crypto::verify("", b"", key, Algorithm::ES256)
        .map(|_| ())
        .map_err(|_| "not a valid EC P-256 public key (only ES256 is supported)".to_owned())
}

pub(super) async fn load_jwks_file(path: &Path) -> Result<Vec<VerifyKey>, String> {
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|e| format!("cannot read: {e}"))?;
    let set: JwkSet =
        serde_json::from_slice(&bytes).map_err(|e| format!("not a valid JWK set: {e}"))?;
    let (keys, problems) = keys_from_jwk_set(&set);
    if let Some(problem) = problems.into_iter().next() {
        return Err(problem);
    }
    if keys.is_empty() {
        return Err("holds no RS256 or ES256 signing key".to_owned());
    }
    Ok(keys)
}

/// The usable keys of a set, and a message for each RS256/ES256 key that is broken. Keys of other
/// types or for other uses (encryption, `oct` secrets, other curves) are skipped: a JWK set must
/// never be able to switch on HS256.
pub(super) fn keys_from_jwk_set(set: &JwkSet) -> (Vec<VerifyKey>, Vec<String>) {
    let mut keys = Vec::new();
    let mut problems = Vec::new();
    for jwk in &set.keys {
        match key_from_jwk(jwk) {
            Ok(Some(key)) => keys.push(key),
            Ok(None) => {}
            Err(problem) => {
                let kid = jwk.common.key_id.as_deref().unwrap_or("(no kid)");
                problems.push(format!("key `{kid}`: {problem}"));
            }
        }
    }
    (keys, problems)
}

pub(super) fn key_from_jwk(jwk: &Jwk) -> Result<Option<VerifyKey>, String> {
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return Ok(None);
    }
    let declared = jwk.common.key_algorithm;
    let alg = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) if declared.is_none_or(|a| a == KeyAlgorithm::RS256) => {
            Algorithm::RS256
        }
        AlgorithmParameters::EllipticCurve(params)
            if params.curve == EllipticCurve::P256
                && declared.is_none_or(|a| a == KeyAlgorithm::ES256) =>
        {
            Algorithm::ES256
        }
        _ => return Ok(None),
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|_| "invalid key parameters".to_owned())?;
    if alg == Algorithm::RS256 {
        check_rsa_key(&key)?;
    } else {
        check_es256_key(&key)?;
    }
    Ok(Some(VerifyKey {
        alg,
        kid: jwk.common.key_id.clone(),
        key,
    }))
}
