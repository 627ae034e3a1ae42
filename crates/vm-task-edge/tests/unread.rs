//! Bodies are not read before the request is admitted (issue #11 item 7): the workers ask the
//! edge to decide from the head alone (route, token, `Content-Length`) and read the body only
//! when it is not refused.

mod common;

use common::*;
use vm_task_edge::http::Request;

const TWENTY_MB: &str = "20000000";

#[test]
fn an_anonymous_20_mb_post_is_refused_401_from_its_head_alone() {
    let edge = Edge::new();
    let head = Request::new("POST", "/vm/tasks").header("content-length", TWENTY_MB);
    let refusal = edge.api().refuse_unread(&head).expect("refused unread");
    assert_eq!(refusal.status, 401, "{}", body_text(&refusal));
    let head = Request::new("POST", "/tasks/0190b5a4-3b7c-7def-8abc-0123456789ab/claim")
        .bearer("guess")
        .header("content-length", TWENTY_MB);
    assert_eq!(edge.consumer().refuse_unread(&head).expect("refused unread").status, 401);
}

#[test]
fn an_authenticated_body_declared_over_64_kib_is_refused_413_unread() {
    let edge = Edge::new();
    let head = Request::new("POST", "/vm/tasks").bearer(CLIENT).header("content-length", TWENTY_MB);
    let refusal = edge.api().refuse_unread(&head).expect("refused unread");
    assert_eq!(refusal.status, 413);
    assert!(body_text(&refusal).contains("request body is 20000000 bytes (Content-Length)"), "{}", body_text(&refusal));
    let head = Request::new("PUT", "/vm/tasks/0190b5a4-3b7c-7def-8abc-0123456789ab/status")
        .bearer(CONSUMER)
        .header("content-length", "65537");
    assert_eq!(edge.api().refuse_unread(&head).expect("refused unread").status, 413);
}

#[test]
fn an_admitted_head_is_left_for_the_handler_and_unknown_routes_are_refused_unread() {
    let edge = Edge::new();
    let head = Request::new("POST", "/vm/tasks").bearer(CLIENT).header("content-length", "65536");
    assert!(edge.api().refuse_unread(&head).is_none(), "64 KiB is within the limit");
    assert!(edge.api().refuse_unread(&Request::new("GET", "/health")).is_none());
    assert!(edge.api().refuse_unread(&Request::new("OPTIONS", "/vm/tasks")).is_none(), "preflight is the handler's");
    assert_eq!(edge.api().refuse_unread(&Request::new("POST", "/nope")).unwrap().status, 404);
    let head = Request::new("POST", "/tasks/x/claim").bearer(CONSUMER).header("content-length", "10");
    assert!(edge.consumer().refuse_unread(&head).is_none());
}
