//! Errors the API returns, shaped as OpenAI does: `{"error":{"message","type","code"}}`.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{ResBody, boxed_full};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, kind, code, message: message.into(), retry_after_secs: None }
    }

    pub fn invalid_json(reason: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_json",
            format!("invalid JSON body: {reason}"),
        )
    }

    pub fn model_missing() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            "the request body has no \"model\" field; name one of the models listed at GET /v1/models",
        )
    }

    pub fn model_unknown(model: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("the model {model:?} does not exist on this router; see GET /v1/models"),
        )
    }

    pub fn body_too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("request body exceeds the limit of {limit} bytes"),
        )
    }

    pub fn body_timeout() -> ApiError {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            "the request body was not received in time",
        )
    }

    pub fn body_read(reason: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_body",
            format!("could not read the request body: {reason}"),
        )
    }

    pub fn no_healthy_endpoint(model: &str, retry_after_secs: u64) -> ApiError {
        ApiError {
            retry_after_secs: Some(retry_after_secs),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "no_healthy_endpoint",
                format!("no healthy endpoint is available for model {model:?}; retry later"),
            )
        }
    }

    pub fn upstream_timeout(model: &str) -> ApiError {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            "upstream_timeout",
            format!("the model server for {model:?} did not answer in time"),
        )
    }

    pub fn upstream_failed(model: &str, reason: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            "upstream_error",
            format!("the model server for {model:?} failed: {reason}"),
        )
    }

    pub fn not_found(path: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "unknown_url", format!("unknown path {path}"))
    }

    pub fn method_not_allowed(method: &http::Method, path: &str) -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            format!("{method} is not allowed on {path}"),
        )
    }

    /// An admin request that names something that does not exist or cannot take the action.
    pub fn admin(status: StatusCode, message: impl Into<String>) -> ApiError {
        let code = if status == StatusCode::NOT_FOUND { "not_found" } else { "invalid_admin_request" };
        ApiError::new(status, "invalid_request_error", code, message)
    }

    pub fn not_ready() -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "not_ready", "the router is not ready")
    }

    /// The router (or a model on it) is over capacity: shed before doing work.
    pub fn overloaded(what: &str, retry_after_secs: u64) -> ApiError {
        ApiError {
            retry_after_secs: Some(retry_after_secs),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "overloaded",
                format!("{what}; retry after {retry_after_secs} s"),
            )
        }
    }

    /// A tenant over one of its limits.
    pub fn rate_limited(limit: &str, retry_after_secs: u64) -> ApiError {
        ApiError {
            retry_after_secs: Some(retry_after_secs),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
                format!("rate limit reached for {limit}; retry after {retry_after_secs} s"),
            )
        }
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "the admin API needs `Authorization: Bearer <admin token>`",
        )
    }

    pub fn body_json(&self) -> Bytes {
        let v = serde_json::json!({
            "error": { "message": self.message, "type": self.kind, "code": self.code, "param": null }
        });
        Bytes::from(serde_json::to_vec(&v).expect("json value serialises"))
    }

    pub fn into_response(self) -> Response<ResBody> {
        let mut res = Response::new(boxed_full(self.body_json()));
        *res.status_mut() = self.status;
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(secs) = self.retry_after_secs {
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}
