//! Who may do what over HTTP: a bearer token, compared in constant time
//! (the `subtle` crate's `ConstantTimeEq`, over SHA-256 digests of both
//! sides so that not even the token's length leaks).
//!
//! Reads (status, events, metrics) are open on a loopback address, and
//! need the token beyond it (the master refuses to listen beyond loopback
//! without one). Writes (jobs, actions, stop) always need the token: on
//! loopback without a token configured they are refused.

use super::{ApiError, HttpError};
use axum::http::{header, HeaderMap, StatusCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The token, kept as its digest.
#[derive(Clone)]
pub(crate) struct Token {
    digest: [u8; 32],
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// The token `text` (trimmed) from `from` (for the error).
    ///
    /// # Errors
    /// [`HttpError::EmptyToken`].
    pub(crate) fn new(text: &str, from: &str) -> Result<Token, HttpError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(HttpError::EmptyToken {
                from: from.to_string(),
            });
        }
        Ok(Token {
            digest: Sha256::digest(text.as_bytes()).into(),
        })
    }

    /// Whether `given` is the token, in time that does not depend on
    /// where they differ.
    pub(crate) fn matches(&self, given: &str) -> bool {
        let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        self.digest.ct_eq(&given).into()
    }
}

/// The rules of one server.
#[derive(Debug)]
pub(crate) struct Access {
    /// The token, if any.
    pub(crate) token: Option<Token>,
    /// The server listens on a loopback address.
    pub(crate) loopback: bool,
}

impl Access {
    /// A read: open on loopback, else the token.
    ///
    /// # Errors
    /// 401 without the right token beyond loopback.
    pub(crate) fn read(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.loopback {
            return Ok(());
        }
        self.check(headers)
    }

    /// A write: always the token.
    ///
    /// # Errors
    /// 403 when no token is configured, 401 without the right one.
    pub(crate) fn write(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        self.check(headers)
    }

    fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(token) = &self.token else {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "no token is configured: set http.token, http.token_file or \
                 TASKHERD_HTTP_TOKEN to allow jobs and actions",
            ));
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                let (scheme, rest) = value.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            });
        match given {
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the token is missing: send Authorization: Bearer TOKEN",
            )),
            Some(given) if token.matches(given) => Ok(()),
            Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "wrong token")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(authorization: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(value) = authorization {
            headers.insert(header::AUTHORIZATION, value.parse().expect("ascii"));
        }
        headers
    }

    #[test]
    fn reads_are_open_on_loopback_only_and_writes_need_the_token() {
        let token = || Some(Token::new(" s3cret\n", "test").expect("token"));
        let status = |result: Result<(), ApiError>| result.err().map(|err| err.status.as_u16());
        let local = Access {
            token: token(),
            loopback: true,
        };
        assert_eq!(status(local.read(&headers(None))), None);
        assert_eq!(status(local.write(&headers(None))), Some(401));
        assert_eq!(
            status(local.write(&headers(Some("Bearer nope")))),
            Some(401)
        );
        assert_eq!(
            status(local.write(&headers(Some("Basic s3cret")))),
            Some(401)
        );
        assert_eq!(status(local.write(&headers(Some("Bearer s3cret")))), None);
        assert_eq!(status(local.write(&headers(Some("bearer  s3cret ")))), None);
        let public = Access {
            token: token(),
            loopback: false,
        };
        assert_eq!(status(public.read(&headers(None))), Some(401));
        assert_eq!(
            status(public.read(&headers(Some("Bearer s3cre")))),
            Some(401)
        );
        assert_eq!(status(public.read(&headers(Some("Bearer s3cret")))), None);
        let tokenless = Access {
            token: None,
            loopback: true,
        };
        assert_eq!(status(tokenless.read(&headers(None))), None);
        assert_eq!(
            status(tokenless.write(&headers(Some("Bearer x")))),
            Some(403)
        );
        assert!(matches!(
            Token::new("  ", "http.token"),
            Err(HttpError::EmptyToken { .. })
        ));
        assert_eq!(format!("{:?}", token().expect("token")), "Token(..)");
    }
}
