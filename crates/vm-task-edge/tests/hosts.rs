//! The host registry: daemons' reports on their polls, `GET /hosts` with liveness, and the
//! POST's warning when no live host serves the target server; production KV limits on.

mod common;

use common::*;
use serde_json::Value;
use vm_task_edge::http::Request;

const REPORT: &str = "consumerId=host-a&hostName=rack1.example&version=0.3.0&concurrency=4&inFlight=2&arrakis=up";

fn poll(edge: &Edge, servers: &str, report: Option<&str>) -> (u16, Value) {
    let query = match report {
        Some(report) => format!("/tasks/ready?server={servers}&{report}"),
        None => format!("/tasks/ready?server={servers}"),
    };
    let r = edge.consumer_call(Request::new("GET", &query).bearer(CONSUMER));
    (r.status, r.json_body().unwrap_or(Value::Null))
}

fn hosts(edge: &Edge, query: &str) -> Value {
    let r = edge.api_call(Request::new("GET", &format!("/hosts{query}")).bearer(CLIENT));
    assert_eq!(r.status, 200, "{}", body_text(&r));
    r.json_body().unwrap()
}

fn post_warnings(edge: &Edge, server: &str, vm: &str) -> Vec<String> {
    let r = edge.api_call(Request::new("POST", "/vm/tasks").bearer(CLIENT).json_body(&launch(vm, server)));
    assert_eq!(r.status, 202, "{}", body_text(&r));
    let body: Value = r.json_body().unwrap();
    body["warnings"].as_array().map(|w| w.iter().map(|s| s.as_str().unwrap().to_owned()).collect()).unwrap_or_default()
}

#[test]
fn a_reporting_poll_registers_one_live_record_per_server_which_goes_stale() {
    let edge = Edge::new();
    let writes = edge.counters.snapshot().kv_writes;
    let (status, _) = poll(&edge, "production,staging", Some(REPORT));
    assert_eq!(status, 200);
    assert_eq!(edge.counters.snapshot().kv_writes - writes, 4, "a record and a last-seen time per server name");
    let listed = hosts(&edge, "");
    assert_eq!(listed["count"], 2, "{listed}");
    let first = &listed["hosts"][0];
    assert_eq!(first["server"], "production");
    assert_eq!(listed["hosts"][1]["server"], "staging");
    for (field, expected) in [
        ("consumerId", serde_json::json!("host-a")),
        ("hostName", "rack1.example".into()),
        ("version", "0.3.0".into()),
        ("concurrency", 4.into()),
        ("inFlight", 2.into()),
        ("arrakisReachable", true.into()),
        ("servers", serde_json::json!(["production", "staging"])),
        ("live", true.into()),
    ] {
        assert_eq!(first[field], expected, "{field}: {first}");
    }
    assert_eq!(hosts(&edge, "?server=staging")["count"], 1);

    edge.clock.advance_ms(300_000);
    assert_eq!(hosts(&edge, "")["hosts"][0]["live"], true, "live up to HOST_LIVE_SECONDS");
    edge.clock.advance_ms(1_000);
    let stale = hosts(&edge, "");
    assert_eq!(stale["hosts"][0]["live"], false, "{stale}");
    assert_eq!(stale["hosts"][0]["lastSeenSecsAgo"], 301);
}

#[test]
fn a_poll_without_a_report_writes_nothing() {
    let edge = Edge::new();
    poll(&edge, "production", None);
    assert_eq!(edge.counters.snapshot().kv_writes, 0);
    assert!(edge.buffer.keys().iter().all(|k| !k.starts_with("host:")), "{:?}", edge.buffer.keys());
    assert_eq!(hosts(&edge, "")["count"], 0);
}

#[test]
fn a_post_to_a_server_no_live_host_serves_is_queued_with_a_warning() {
    let edge = Edge::new();
    let never = post_warnings(&edge, "elsewhere", "vm-1");
    assert_eq!(never.len(), 1, "{never:?}");
    assert!(
        never[0].contains("no host has polled for server \"elsewhere\"") && never[0].contains("MAX_QUEUED_SECONDS"),
        "{never:?}"
    );

    poll(&edge, "production", Some(REPORT));
    assert!(post_warnings(&edge, "production", "vm-2").is_empty());

    edge.clock.advance_ms(400_000);
    let stale = post_warnings(&edge, "production", "vm-3");
    assert!(stale[0].contains("no live host serves server \"production\" (the last was seen 400 s ago)"), "{stale:?}");
    assert_eq!(edge.queue.drain().len(), 3, "every task was queued");
}

#[test]
fn bad_reports_are_400s_naming_the_parameter() {
    let edge = Edge::new();
    for (report, field) in [
        ("hostName=h&consumerId=", "consumerId"),
        ("hostName=&consumerId=c", "hostName"),
        ("hostName=h&consumerId=c&concurrency=lots", "concurrency"),
        ("hostName=h&consumerId=c&inFlight=-1", "inFlight"),
        ("hostName=h&consumerId=c&arrakis=maybe", "arrakis"),
        // Empty is not one of the document's values either (schemathesis sent `arrakis=`).
        ("hostName=h&consumerId=c&arrakis=", "arrakis"),
        ("arrakis=", "arrakis"),
        ("hot=", "hot"),
        ("hostName=h%01&consumerId=c", "hostName"),
    ] {
        let (status, body) = poll(&edge, "production", Some(report));
        assert_eq!(status, 400, "{report}: {body}");
        assert_eq!(body["field"], field, "{report}: {body}");
    }
}

#[test]
fn a_host_serving_32_long_server_names_fits_kv_metadata() {
    let edge = Edge::new();
    let servers: Vec<String> = (0..32).map(|i| format!("{i:02}{}", "s".repeat(61))).collect();
    let (status, body) = poll(&edge, &servers.join(","), Some(REPORT));
    assert_eq!(status, 200, "{body}");
    let listed = hosts(&edge, "");
    assert_eq!(listed["count"], 32);
    for key in edge.buffer.keys().iter().filter(|k| k.starts_with("host:")) {
        let bytes = serde_json::to_vec(&edge.buffer.metadata(key).unwrap()).unwrap().len();
        assert!(bytes <= 1_024, "{key}: {bytes} bytes");
    }
    let kept = listed["hosts"][0]["servers"].as_array().unwrap().len();
    assert!((1..32).contains(&kept), "the list is cut to fit: {kept}");
}
