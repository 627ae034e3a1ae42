//! The route tables of both workers, written once: dispatch uses them, and the OpenAPI test
//! checks the published document against them.

use crate::{http::percent_decode, AppError};

/// `(method, path pattern)`; `{name}` matches one path segment. Earlier entries win.
pub type RouteTable = &'static [(&'static str, &'static str)];

pub const API_ROUTES: RouteTable = &[
    ("GET", "/health"),
    ("GET", "/"),
    ("GET", "/openapi.json"),
    ("GET", "/stats"),
    ("POST", "/vm/tasks"),
    ("GET", "/vm/tasks"),
    ("GET", "/vm/tasks/{id}"),
    ("DELETE", "/vm/tasks/{id}"),
    ("GET", "/vm/tasks/{id}/status"),
    ("PUT", "/vm/tasks/{id}/status"),
    ("GET", "/vm/{vmName}/status"),
];

pub const CONSUMER_ROUTES: RouteTable = &[
    ("GET", "/health"),
    ("GET", "/"),
    ("GET", "/stats"),
    ("GET", "/tasks/ready"),
    ("GET", "/tasks/all"),
    ("DELETE", "/tasks/{id}"),
    ("POST", "/tasks/{id}/claim"),
    ("POST", "/tasks/{id}/heartbeat"),
    ("POST", "/tasks/{id}/release"),
    ("POST", "/admin/sweep"),
];

/// A matched route: its pattern and the decoded values of its `{params}`, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    pub pattern: &'static str,
    pub params: Vec<String>,
}

impl Matched {
    pub fn param(&self, i: usize) -> &str {
        self.params.get(i).map(String::as_str).unwrap_or("")
    }
}

/// Finds the route for `method path`: 404 when no pattern matches the path, 405 (naming the
/// allowed methods) when patterns match but none with this method. `HEAD` is served as `GET`.
pub fn match_route(table: RouteTable, method: &str, path: &str) -> Result<Matched, AppError> {
    let trimmed = if path.len() > 1 { path.trim_end_matches('/') } else { path };
    let segments: Vec<&str> = trimmed.split('/').skip(1).collect();
    let method = if method == "HEAD" { "GET" } else { method };
    let mut allowed = Vec::new();
    for &(route_method, pattern) in table {
        let Some(params) = match_pattern(pattern, &segments) else { continue };
        if route_method == method {
            return Ok(Matched { pattern, params });
        }
        if !allowed.contains(&route_method) {
            allowed.push(route_method);
        }
    }
    if allowed.is_empty() {
        Err(AppError::NotFound(format!("no route for {method} {path}")))
    } else {
        Err(AppError::MethodNotAllowed { method: method.to_owned(), path: path.to_owned(), allowed })
    }
}

fn match_pattern(pattern: &str, segments: &[&str]) -> Option<Vec<String>> {
    let parts: Vec<&str> = if pattern == "/" { vec![""] } else { pattern.split('/').skip(1).collect() };
    if parts.len() != segments.len() {
        return None;
    }
    let mut params = Vec::new();
    for (part, segment) in parts.iter().zip(segments) {
        if part.starts_with('{') {
            if segment.is_empty() {
                return None;
            }
            params.push(percent_decode(segment));
        } else if part != segment {
            return None;
        }
    }
    Some(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_literal_and_parameter_routes() {
        let m = match_route(API_ROUTES, "GET", "/vm/tasks/abc/status").unwrap();
        assert_eq!((m.pattern, m.param(0)), ("/vm/tasks/{id}/status", "abc"));
        let m = match_route(API_ROUTES, "GET", "/vm/my%20vm/status").unwrap();
        assert_eq!((m.pattern, m.param(0)), ("/vm/{vmName}/status", "my vm"));
        assert_eq!(match_route(API_ROUTES, "GET", "/").unwrap().pattern, "/");
        assert_eq!(match_route(API_ROUTES, "GET", "/vm/tasks/").unwrap().pattern, "/vm/tasks");
        assert_eq!(match_route(API_ROUTES, "HEAD", "/health").unwrap().pattern, "/health");
    }

    #[test]
    fn unknown_paths_are_404_and_wrong_methods_405() {
        assert_eq!(match_route(API_ROUTES, "GET", "/nope").unwrap_err().status(), 404);
        let err = match_route(API_ROUTES, "PATCH", "/vm/tasks/x").unwrap_err();
        assert_eq!(err.status(), 405);
        assert!(err.to_string().contains("GET, DELETE"), "{err}");
        assert_eq!(match_route(CONSUMER_ROUTES, "GET", "/tasks//claim").unwrap_err().status(), 404);
    }

    #[test]
    fn every_route_is_reachable() {
        for table in [API_ROUTES, CONSUMER_ROUTES] {
            for &(method, pattern) in table {
                let path = pattern.replace("{id}", "0190b5a4-3b7c-7def-8abc-0123456789ab").replace("{vmName}", "vm-1");
                assert_eq!(match_route(table, method, &path).unwrap().pattern, pattern);
            }
        }
    }
}
