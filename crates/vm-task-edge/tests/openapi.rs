//! The published OpenAPI document (`openapi.json` at the repository root, served by the API
//! worker at `/openapi.json`) against the route tables the workers dispatch on, and against
//! what the handlers answer.
//!
//! Paths of the consumer worker are documented as the dev gateway serves them, under
//! `/consumer`.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use serde_json::{json, Value};
use vm_task_edge::{
    http::Request,
    routes::{RouteTable, API_ROUTES, CONSUMER_ROUTES},
};

const CONSUMER_PREFIX: &str = "/consumer";
const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];
const ERROR_BODY: &str = "#/components/schemas/ErrorBody";

fn document() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../openapi.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// `"METHOD /path"` of every route both workers serve, consumer routes under the gateway prefix.
fn implemented() -> BTreeSet<String> {
    let prefixed = |table: RouteTable, prefix: &str| -> Vec<String> {
        table
            .iter()
            .map(|(method, path)| {
                let path =
                    if prefix.is_empty() || *path != "/" { format!("{prefix}{path}") } else { format!("{prefix}/") };
                format!("{method} {path}")
            })
            .collect()
    };
    prefixed(API_ROUTES, "").into_iter().chain(prefixed(CONSUMER_ROUTES, CONSUMER_PREFIX)).collect()
}

/// Every documented operation: `"METHOD /path"` → the operation object.
fn operations(doc: &Value) -> BTreeMap<String, (String, Value)> {
    let mut out = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().expect("`paths` is an object") {
        for method in METHODS {
            if let Some(op) = item.get(method) {
                out.insert(format!("{} {path}", method.to_ascii_uppercase()), (path.clone(), op.clone()));
            }
        }
    }
    out
}

/// Follows a local `$ref` (`#/components/...`) once; other values are returned as they are.
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference.strip_prefix('#').unwrap_or_else(|| panic!("non-local $ref {reference}"));
            doc.pointer(pointer).unwrap_or_else(|| panic!("dangling $ref {reference}"))
        }
        None => value,
    }
}

/// Names of the path parameters an operation declares, at path level or its own.
fn declared_path_params(doc: &Value, path: &str, op: &Value) -> BTreeSet<String> {
    let path_level = doc["paths"][path]["parameters"].as_array().cloned().unwrap_or_default();
    let own = op["parameters"].as_array().cloned().unwrap_or_default();
    path_level
        .iter()
        .chain(own.iter())
        .map(|p| resolve(doc, p))
        .filter(|p| p["in"] == "path")
        .map(|p| p["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn template_params(path: &str) -> BTreeSet<String> {
    path.split('/').filter_map(|s| s.strip_prefix('{')?.strip_suffix('}')).map(str::to_owned).collect()
}

#[test]
fn every_route_is_documented_and_every_documented_route_exists() {
    let doc = document();
    let documented: BTreeSet<String> = operations(&doc).into_keys().collect();
    let routes = implemented();
    let missing: Vec<&String> = routes.difference(&documented).collect();
    let extra: Vec<&String> = documented.difference(&routes).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "openapi.json and the route tables differ:\n  served but not documented: {missing:?}\n  documented but not served: {extra:?}"
    );
}

#[test]
fn path_parameters_match_the_path_templates() {
    let doc = document();
    let mut problems = Vec::new();
    for (name, (path, op)) in operations(&doc) {
        let (declared, wanted) = (declared_path_params(&doc, &path, &op), template_params(&path));
        if declared != wanted {
            problems.push(format!("{name}: template has {wanted:?}, parameters declare {declared:?}"));
        }
    }
    assert!(problems.is_empty(), "path parameters differ from their templates:\n  {}", problems.join("\n  "));
}

#[test]
fn every_operation_has_a_success_response_and_errors_use_error_body() {
    let doc = document();
    let mut problems = Vec::new();
    for (name, (_, op)) in operations(&doc) {
        let responses = op["responses"].as_object().cloned().unwrap_or_default();
        if !responses.keys().any(|code| code.starts_with('2')) {
            problems.push(format!("{name}: no 2xx response"));
        }
        for (code, response) in &responses {
            if !(code.starts_with('4') || code.starts_with('5')) {
                continue;
            }
            let schema = &resolve(&doc, response)["content"]["application/json"]["schema"];
            if schema.get("$ref").and_then(Value::as_str) != Some(ERROR_BODY) {
                problems.push(format!("{name} {code}: schema is {schema}, not {ERROR_BODY}"));
            }
        }
    }
    assert!(problems.is_empty(), "operations with wrong responses:\n  {}", problems.join("\n  "));
}

/// Which tokens the document says an operation takes: `None` for an open one.
fn documented_tokens(op: &Value) -> Option<BTreeSet<String>> {
    let requirements = op["security"].as_array().expect("every operation states its security");
    if requirements.is_empty() {
        return None;
    }
    Some(requirements.iter().flat_map(|r| r.as_object().into_iter().flat_map(|o| o.keys().cloned())).collect())
}

/// Calls one documented operation on the in-memory edge with `token` (or none) and a body
/// that is a well-formed JSON object, with the task id of a task that exists.
fn probe(edge: &Edge, method: &str, path: &str, token: Option<&str>, task_id: &str) -> u16 {
    let concrete = path.replace("{id}", task_id).replace("{vmName}", "vm-1");
    let (is_consumer, route) = match concrete.strip_prefix(CONSUMER_PREFIX) {
        Some(rest) => (true, if rest.is_empty() { "/".to_owned() } else { rest.to_owned() }),
        None => (false, concrete),
    };
    let mut request = Request::new(method, &route);
    if let Some(token) = token {
        request = request.bearer(token);
    }
    if matches!(method, "POST" | "PUT") {
        request = request.json_body(&json!({}));
    }
    let response = if is_consumer { edge.consumer_call(request) } else { edge.api_call(request) };
    response.status
}

#[test]
fn documented_security_is_what_the_handlers_check() {
    let doc = document();
    let mut edge = Edge::new();
    edge.api_config.openapi = Some("{}");
    let id = edge.submit(launch("vm-1", "production")).to_string();
    let mut problems = Vec::new();
    for (name, (path, op)) in operations(&doc) {
        let method = name.split(' ').next().unwrap_or_default();
        let documented = documented_tokens(&op);
        let anonymous = probe(&edge, method, &path, None, &id);
        match &documented {
            None if anonymous == 401 => {
                problems.push(format!("{name}: documented as open, answers 401 without a token"))
            }
            Some(_) if anonymous != 401 => {
                problems.push(format!("{name}: documented with a token, answers {anonymous} without one"))
            }
            _ => {}
        }
        let Some(documented) = documented else { continue };
        for (scheme, token) in [("clientToken", CLIENT), ("consumerToken", CONSUMER)] {
            let accepted = probe(&edge, method, &path, Some(token), &id) != 401;
            if accepted != documented.contains(scheme) {
                let verb = if accepted { "accepts" } else { "refuses" };
                problems.push(format!("{name}: {verb} the {scheme}, the document lists {documented:?}"));
            }
        }
    }
    assert!(problems.is_empty(), "security in openapi.json differs from the handlers:\n  {}", problems.join("\n  "));
}

#[test]
fn statuses_the_handlers_answer_to_simple_probes_are_documented() {
    let doc = document();
    let mut edge = Edge::new();
    edge.api_config.openapi = Some("{}");
    let existing = edge.submit(launch("vm-1", "production")).to_string();
    let unknown = "0190b5a4-3b7c-7def-8abc-0123456789ab";
    let mut problems = Vec::new();
    for (name, (path, op)) in operations(&doc) {
        let method = name.split(' ').next().unwrap_or_default();
        let documented: BTreeSet<String> =
            op["responses"].as_object().into_iter().flatten().map(|(c, _)| c.clone()).collect();
        let token = match documented_tokens(&op) {
            Some(schemes) if !schemes.contains("clientToken") => Some(CONSUMER),
            Some(_) => Some(CLIENT),
            None => None,
        };
        for (what, id) in [("an existing task", existing.as_str()), ("an unknown task", unknown), ("a bad id", "x")] {
            if what != "an existing task" && !path.contains("{id}") {
                continue;
            }
            let status = probe(&edge, method, &path, token, id).to_string();
            if !documented.contains(&status) {
                problems.push(format!("{name} with {what}: answered {status}, documented {documented:?}"));
            }
        }
    }
    assert!(problems.is_empty(), "undocumented statuses:\n  {}", problems.join("\n  "));
}

#[test]
fn the_document_declares_openapi_3_0_3_and_both_bearer_schemes() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.0.3");
    for scheme in ["clientToken", "consumerToken"] {
        let s = &doc["components"]["securitySchemes"][scheme];
        assert_eq!((s["type"].as_str(), s["scheme"].as_str()), (Some("http"), Some("bearer")), "{scheme}: {s}");
    }
    let description = doc["info"]["description"].as_str().unwrap_or_default();
    assert!(description.contains("/consumer") && description.contains("own host"), "{description}");
}
