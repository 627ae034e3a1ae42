//! A runtime-free HTTP request and response, so routing and handlers test natively.

use serde::{de::DeserializeOwned, Serialize};
use vm_task_types::Limits;

use crate::AppError;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Request {
    pub method: String,
    /// The path without the query string, percent-decoded per segment by the router.
    pub path: String,
    /// Query pairs, percent-decoded.
    pub query: Vec<(String, String)>,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn new(method: &str, path_and_query: &str) -> Self {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, parse_query(q)),
            None => (path_and_query, Vec::new()),
        };
        Self { method: method.to_owned(), path: path.to_owned(), query, ..Self::default() }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.to_owned()));
        self
    }

    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }

    pub fn json_body(mut self, body: &impl Serialize) -> Self {
        self.body = serde_json::to_vec(body).unwrap_or_default();
        self.header("content-type", "application/json")
    }

    pub fn get_header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub(crate) fn query_param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Refuses a body that `Content-Length` says is over the limit, before anyone reads it.
    pub(crate) fn check_declared_length(&self) -> Result<(), AppError> {
        let declared = self.get_header("content-length").and_then(|v| v.trim().parse::<u64>().ok());
        match declared {
            Some(length) if length > Limits::BODY_MAX_BYTES as u64 => Err(AppError::PayloadTooLarge(format!(
                "request body is {length} bytes (Content-Length); the limit is {} bytes",
                Limits::BODY_MAX_BYTES
            ))),
            _ => Ok(()),
        }
    }

    /// Parses the JSON body as `T`, with 4xx errors for every way it can be wrong.
    pub(crate) fn json<T: DeserializeOwned>(&self) -> Result<T, AppError> {
        let value = self.json_value()?;
        serde_json::from_value(value)
            .map_err(|e| AppError::bad_request("invalid_body", format!("invalid request body: {e}")))
    }

    /// The body as a JSON value: checks size, content type, emptiness and syntax.
    pub(crate) fn json_value(&self) -> Result<serde_json::Value, AppError> {
        if self.body.len() > Limits::BODY_MAX_BYTES {
            return Err(AppError::PayloadTooLarge(format!(
                "request body is {} bytes; the limit is {} bytes",
                self.body.len(),
                Limits::BODY_MAX_BYTES
            )));
        }
        if let Some(ct) = self.get_header("content-type") {
            let media = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            if media != "application/json" && !media.ends_with("+json") {
                return Err(AppError::UnsupportedMediaType(format!(
                    "content type {ct:?} is not supported; send application/json"
                )));
            }
        }
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Err(AppError::bad_request("empty_body", "request body is empty; expected a JSON object"));
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| AppError::bad_request("malformed_json", format!("request body is not valid JSON: {e}")))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub(crate) fn json(status: u16, body: &impl Serialize) -> Self {
        let body = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
        Self { status, headers: vec![("content-type".into(), "application/json".into())], body }
    }

    pub(crate) fn empty(status: u16) -> Self {
        Self { status, headers: Vec::new(), body: Vec::new() }
    }

    pub(crate) fn error(err: &AppError) -> Self {
        let mut response = Self::json(err.status(), &err.body());
        if let AppError::MethodNotAllowed { allowed, .. } = err {
            response.headers.push(("allow".into(), allowed.join(", ")));
        }
        if let AppError::Unauthorized(_) = err {
            response.headers.push(("www-authenticate".into(), "Bearer".into()));
        }
        response
    }

    pub(crate) fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.to_owned()));
        self
    }

    pub fn get_header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The 503 a worker answers to every request while a setting is invalid, naming it.
    pub fn misconfigured(problem: &str) -> Self {
        Self::error(&AppError::Unavailable(format!("the worker is misconfigured: {problem}")))
    }

    /// The body parsed as JSON; for tests and adapters.
    pub fn json_body<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

impl From<AppError> for Response {
    fn from(err: AppError) -> Self {
        Self::error(&err)
    }
}

/// Splits and percent-decodes a query string (`+` is a space, as in forms).
pub(crate) fn parse_query(query: &str) -> Vec<(String, String)> {
    let decode = |s: &str| percent_decode(&s.replace('+', " "));
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Decodes `%XX` escapes; invalid escapes are kept and invalid UTF-8 is replaced, never fatal.
pub(crate) fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_split_and_decoded() {
        let r = Request::new("GET", "/vm/tasks?limit=5&cursor=a%2Bb%3D&x=a+b&flag");
        assert_eq!(r.path, "/vm/tasks");
        assert_eq!(r.query_param("limit"), Some("5"));
        assert_eq!(r.query_param("cursor"), Some("a+b="));
        assert_eq!(r.query_param("x"), Some("a b"));
        assert_eq!(r.query_param("flag"), Some(""));
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
    }

    #[test]
    fn json_bodies_fail_with_the_right_4xx() {
        let status = |r: Request| r.json_value().unwrap_err().status();
        let mut big = Request::new("POST", "/x");
        big.body = vec![b' '; Limits::BODY_MAX_BYTES + 1];
        assert_eq!(status(big), 413);
        let mut form = Request::new("POST", "/x").header("content-type", "application/x-www-form-urlencoded");
        form.body = b"a=b".to_vec();
        assert_eq!(status(form), 415);
        assert_eq!(status(Request::new("POST", "/x")), 400);
        let mut bad = Request::new("POST", "/x").header("content-type", "application/json; charset=utf-8");
        bad.body = b"{\"type\":".to_vec();
        let err = bad.json_value().unwrap_err();
        assert_eq!(err.code(), "malformed_json");
        assert!(err.to_string().contains("EOF"), "{err}");
    }
}
