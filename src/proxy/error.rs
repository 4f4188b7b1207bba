//! Why the proxy did not forward a request, or could not bring its answer back.

use super::bounds::InvalidField;
use super::upstream::UpstreamError;
use crate::metering::HoldRefused;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("request body is larger than the limit of {0} bytes")]
    BodyTooLarge(usize),
    #[error("could not read the request body")]
    BodyUnreadable,
    #[error("We could not parse the JSON body of your request: {0}")]
    NotJson(String),
    #[error("The request body must be a JSON object")]
    NotAnObject,
    #[error("You must provide a model parameter")]
    MissingModel,
    #[error(transparent)]
    InvalidField(#[from] InvalidField),
    /// The caller's API key is limited to other models.
    #[error("This API key may not use the model `{0}`")]
    ModelNotAllowed(String),
    #[error("The model `{0}` does not exist or is not served by this gateway")]
    ModelNotFound(String),
    #[error(transparent)]
    HoldRefused(#[from] HoldRefused),
    /// No upstream answered (the hold was released).
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("the upstream's answer could not be read")]
    AnswerUnreadable,
    #[error("the upstream's answer did not complete in time")]
    AnswerTimedOut,
    #[error("the gateway is shutting down; the request was not completed")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}
