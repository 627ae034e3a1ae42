//! The routes of both workers as enums: each value names its handler, carries its decoded path
//! parameters and says which token it needs ([`Auth`]). Parsing is one `match` on the path's
//! segments per worker and dispatch is an exhaustive `match` on the enum, so a route without a
//! handler, or a handler without a route, does not compile. The tables
//! ([`API_ROUTES`], [`CONSUMER_ROUTES`]) list the same routes as text for the index page and the
//! OpenAPI test; a unit test checks that every entry parses to the route whose pattern it is.

use crate::{http::percent_decode, AppError};

/// `(method, path pattern)`; `{name}` stands for one path segment.
pub type RouteTable = &'static [(&'static str, &'static str)];

pub const API_ROUTES: RouteTable = &[
    ("GET", "/health"),
    ("GET", "/"),
    ("GET", "/openapi.json"),
    ("GET", "/dashboard"),
    ("GET", "/stats"),
    ("POST", "/vm/tasks"),
    ("GET", "/vm/tasks"),
    ("GET", "/vm/tasks/{id}"),
    ("DELETE", "/vm/tasks/{id}"),
    ("GET", "/vm/tasks/{id}/status"),
    ("PUT", "/vm/tasks/{id}/status"),
    ("GET", "/vm/{vmName}/status"),
    ("GET", "/vms"),
    ("GET", "/hosts"),
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

/// Which token a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Auth {
    /// None: health, index, OpenAPI document, dashboard page.
    Public,
    /// A client token (`API_TOKENS`).
    Client,
    /// A consumer token (`CONSUMER_TOKENS`).
    Consumer,
    /// Either: daemons read a task's predecessor through a client route.
    ConsumerOrClient,
}

/// A route of the API worker, with its path parameters (decoded, not yet validated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ApiRoute {
    Health,
    Index,
    OpenApi,
    Dashboard,
    Stats,
    CreateTask,
    ListTasks,
    GetTask { id: String },
    CancelTask { id: String },
    GetTaskStatus { id: String },
    ReportStatus { id: String },
    VmStatus { vm_name: String },
    ListVms,
    ListHosts,
}

impl ApiRoute {
    /// Finds the route for `method path`: 404 when no route has this path, 405 (naming the
    /// allowed methods) when routes do but none with this method. `HEAD` is served as `GET`.
    pub(crate) fn parse(method: &str, path: &str) -> Result<Self, AppError> {
        use ApiRoute::*;
        let segments = segments(path);
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let by_method: Vec<(&'static str, ApiRoute)> = match segments.as_slice() {
            [] => vec![("GET", Index)],
            ["health"] => vec![("GET", Health)],
            ["openapi.json"] => vec![("GET", OpenApi)],
            ["dashboard"] => vec![("GET", Dashboard)],
            ["stats"] => vec![("GET", Stats)],
            ["vms"] => vec![("GET", ListVms)],
            ["hosts"] => vec![("GET", ListHosts)],
            ["vm", "tasks"] => vec![("POST", CreateTask), ("GET", ListTasks)],
            // A VM may be named `tasks`: its status is `/vm/tasks/status`, which no task id
            // (a UUID) can be confused with.
            ["vm", "tasks", "status"] => vec![("GET", VmStatus { vm_name: "tasks".to_owned() })],
            ["vm", "tasks", id] => {
                vec![("GET", GetTask { id: (*id).to_owned() }), ("DELETE", CancelTask { id: (*id).to_owned() })]
            }
            ["vm", "tasks", id, "status"] => {
                vec![("GET", GetTaskStatus { id: (*id).to_owned() }), ("PUT", ReportStatus { id: (*id).to_owned() })]
            }
            ["vm", vm_name, "status"] => vec![("GET", VmStatus { vm_name: (*vm_name).to_owned() })],
            _ => Vec::new(),
        };
        pick(method, path, by_method)
    }

    pub(crate) fn auth(&self) -> Auth {
        use ApiRoute::*;
        match self {
            // The page holds no data: every call it makes carries the client token.
            Health | Index | OpenApi | Dashboard => Auth::Public,
            Stats
            | CreateTask
            | ListTasks
            | GetTask { .. }
            | CancelTask { .. }
            | VmStatus { .. }
            | ListVms
            | ListHosts => Auth::Client,
            GetTaskStatus { .. } => Auth::ConsumerOrClient,
            ReportStatus { .. } => Auth::Consumer,
        }
    }

    /// The route's `(method, pattern)` as written in [`API_ROUTES`].
    #[cfg(test)]
    fn pattern(&self) -> (&'static str, &'static str) {
        use ApiRoute::*;
        match self {
            Health => ("GET", "/health"),
            Index => ("GET", "/"),
            OpenApi => ("GET", "/openapi.json"),
            Dashboard => ("GET", "/dashboard"),
            Stats => ("GET", "/stats"),
            CreateTask => ("POST", "/vm/tasks"),
            ListTasks => ("GET", "/vm/tasks"),
            GetTask { .. } => ("GET", "/vm/tasks/{id}"),
            CancelTask { .. } => ("DELETE", "/vm/tasks/{id}"),
            GetTaskStatus { .. } => ("GET", "/vm/tasks/{id}/status"),
            ReportStatus { .. } => ("PUT", "/vm/tasks/{id}/status"),
            VmStatus { .. } => ("GET", "/vm/{vmName}/status"),
            ListVms => ("GET", "/vms"),
            ListHosts => ("GET", "/hosts"),
        }
    }
}

/// A route of the consumer worker, with its path parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ConsumerRoute {
    Health,
    Index,
    Stats,
    Ready,
    All,
    DeleteEntry { id: String },
    Claim { id: String },
    Heartbeat { id: String },
    Release { id: String },
    Sweep,
}

impl ConsumerRoute {
    /// As [`ApiRoute::parse`].
    pub(crate) fn parse(method: &str, path: &str) -> Result<Self, AppError> {
        use ConsumerRoute::*;
        let segments = segments(path);
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let by_method: Vec<(&'static str, ConsumerRoute)> = match segments.as_slice() {
            [] => vec![("GET", Index)],
            ["health"] => vec![("GET", Health)],
            ["stats"] => vec![("GET", Stats)],
            ["tasks", "ready"] => vec![("GET", Ready)],
            ["tasks", "all"] => vec![("GET", All)],
            ["tasks", id] => vec![("DELETE", DeleteEntry { id: (*id).to_owned() })],
            ["tasks", id, "claim"] => vec![("POST", Claim { id: (*id).to_owned() })],
            ["tasks", id, "heartbeat"] => vec![("POST", Heartbeat { id: (*id).to_owned() })],
            ["tasks", id, "release"] => vec![("POST", Release { id: (*id).to_owned() })],
            ["admin", "sweep"] => vec![("POST", Sweep)],
            _ => Vec::new(),
        };
        pick(method, path, by_method)
    }

    pub(crate) fn auth(&self) -> Auth {
        use ConsumerRoute::*;
        match self {
            Health | Index => Auth::Public,
            Stats | Ready | All | DeleteEntry { .. } | Claim { .. } | Heartbeat { .. } | Release { .. } | Sweep => {
                Auth::Consumer
            }
        }
    }

    #[cfg(test)]
    fn pattern(&self) -> (&'static str, &'static str) {
        use ConsumerRoute::*;
        match self {
            Health => ("GET", "/health"),
            Index => ("GET", "/"),
            Stats => ("GET", "/stats"),
            Ready => ("GET", "/tasks/ready"),
            All => ("GET", "/tasks/all"),
            DeleteEntry { .. } => ("DELETE", "/tasks/{id}"),
            Claim { .. } => ("POST", "/tasks/{id}/claim"),
            Heartbeat { .. } => ("POST", "/tasks/{id}/heartbeat"),
            Release { .. } => ("POST", "/tasks/{id}/release"),
            Sweep => ("POST", "/admin/sweep"),
        }
    }
}

/// The decoded segments of a path; one trailing slash is ignored, and an empty segment (`//`)
/// matches nothing, since every route's segments are non-empty.
fn segments(path: &str) -> Vec<String> {
    let trimmed = if path.len() > 1 { path.trim_end_matches('/') } else { path };
    if trimmed == "/" || trimmed.is_empty() {
        return Vec::new();
    }
    let raw: Vec<&str> = trimmed.split('/').skip(1).collect();
    if raw.iter().any(|s| s.is_empty()) {
        // Cannot match any route: a segment that no pattern has.
        return vec![String::new()];
    }
    raw.into_iter().map(percent_decode).collect()
}

/// The route for `method` among those the path matched, or 404 / 405.
fn pick<R>(method: &str, path: &str, by_method: Vec<(&'static str, R)>) -> Result<R, AppError> {
    let method = if method == "HEAD" { "GET" } else { method };
    if by_method.is_empty() {
        return Err(AppError::NotFound(format!("no route for {method} {path}")));
    }
    let allowed: Vec<&'static str> = by_method.iter().map(|(m, _)| *m).collect();
    by_method
        .into_iter()
        .find(|(m, _)| *m == method)
        .map(|(_, route)| route)
        .ok_or_else(|| AppError::MethodNotAllowed { method: method.to_owned(), path: path.to_owned(), allowed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_literal_and_parameter_routes() {
        assert_eq!(
            ApiRoute::parse("GET", "/vm/tasks/abc/status").unwrap(),
            ApiRoute::GetTaskStatus { id: "abc".into() }
        );
        assert_eq!(
            ApiRoute::parse("GET", "/vm/my%20vm/status").unwrap(),
            ApiRoute::VmStatus { vm_name: "my vm".into() }
        );
        assert_eq!(ApiRoute::parse("GET", "/").unwrap(), ApiRoute::Index);
        assert_eq!(ApiRoute::parse("GET", "/vm/tasks/").unwrap(), ApiRoute::ListTasks);
        assert_eq!(ApiRoute::parse("HEAD", "/health").unwrap(), ApiRoute::Health);
    }

    #[test]
    fn a_vm_named_tasks_has_a_status_route() {
        assert_eq!(ApiRoute::parse("GET", "/vm/tasks/status").unwrap(), ApiRoute::VmStatus { vm_name: "tasks".into() });
        assert_eq!(ApiRoute::parse("GET", "/vm/tasks/abc").unwrap(), ApiRoute::GetTask { id: "abc".into() });
    }

    #[test]
    fn unknown_paths_are_404_and_wrong_methods_405() {
        assert_eq!(ApiRoute::parse("GET", "/nope").unwrap_err().status(), 404);
        let err = ApiRoute::parse("PATCH", "/vm/tasks/x").unwrap_err();
        assert_eq!(err.status(), 405);
        assert!(err.to_string().contains("GET, DELETE"), "{err}");
        assert_eq!(ConsumerRoute::parse("GET", "/tasks//claim").unwrap_err().status(), 404);
    }

    #[test]
    fn every_table_entry_parses_to_the_route_of_its_pattern() {
        let concrete =
            |pattern: &str| pattern.replace("{id}", "0190b5a4-3b7c-7def-8abc-0123456789ab").replace("{vmName}", "vm-1");
        for &(method, pattern) in API_ROUTES {
            let route = ApiRoute::parse(method, &concrete(pattern)).unwrap();
            assert_eq!(route.pattern(), (method, pattern));
        }
        for &(method, pattern) in CONSUMER_ROUTES {
            let route = ConsumerRoute::parse(method, &concrete(pattern)).unwrap();
            assert_eq!(route.pattern(), (method, pattern));
        }
    }
}
