//! Bearer-token checks, CORS, and the signature that makes list cursors unforgeable.
//!
//! Tokens come from worker secrets as comma-separated lists so a new token can be added
//! before the old one is removed. Comparisons take the same time whatever the input.

use sha2::{Digest, Sha256};

use crate::{http::Request, routes::Auth, AppError};

/// Who sent an admitted request, as far as the handlers need to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Caller {
    /// A public route: no token was asked for.
    Anonymous,
    /// A client; `scope` (a hash of its token) keeps its idempotency keys apart from others'.
    Client { scope: String },
    /// A daemon, allowed every server or only the ones its token is bound to.
    Consumer { servers: Option<Vec<String>> },
}

impl Caller {
    /// 403 unless this caller may act for `server` (clients and unbound consumers may).
    pub(crate) fn check_server(&self, server: &str) -> Result<(), AppError> {
        match self {
            Caller::Consumer { servers: Some(allowed) } if !allowed.iter().any(|s| s == server) => {
                Err(AppError::Forbidden(format!(
                    "this consumer token is bound to servers {}; it may not act for server {server:?}",
                    allowed.join(", ")
                )))
            }
            _ => Ok(()),
        }
    }

    /// `?server=` on a claim, heartbeat, release or status report: the task's server, named by
    /// the daemon so the durable mode's workers ask that server's object without reading the
    /// task record. Both modes check it alike: an invalid name is a 400, a server the caller's
    /// token is not bound to a 403 (and [`on_named_server`] a task on another server a 404).
    pub(crate) fn named_server<'r>(&self, request: &'r Request) -> Result<Option<&'r str>, AppError> {
        let Some(server) = request.query_param("server") else { return Ok(None) };
        vm_task_types::validate::check_server_name("server", server)?;
        self.check_server(server)?;
        Ok(Some(server))
    }

    /// 403 for a consumer token bound to servers: the route spans every server.
    pub(crate) fn check_unbound(&self, what: &str) -> Result<(), AppError> {
        match self {
            Caller::Consumer { servers: Some(_) } => {
                Err(AppError::Forbidden(format!("{what} needs a consumer token that is not bound to servers")))
            }
            _ => Ok(()),
        }
    }
}

/// Checks that the request carries the token `auth` asks for; the one place routes are
/// authenticated, before any handler runs.
pub(crate) fn authorize(
    auth: Auth,
    request: &Request,
    clients: &Tokens,
    consumers: &Tokens,
) -> Result<Caller, AppError> {
    let client = |request: &Request| -> Result<Caller, AppError> {
        let token = clients.check(request, "client")?;
        Ok(Caller::Client { scope: sha256_hex(token.token.as_bytes()) })
    };
    let consumer = |request: &Request| -> Result<Caller, AppError> {
        let token = consumers.check(request, "consumer")?;
        Ok(Caller::Consumer { servers: token.servers.clone() })
    };
    match auth {
        Auth::Public => Ok(Caller::Anonymous),
        Auth::Client => client(request),
        Auth::Consumer => consumer(request),
        Auth::ConsumerOrClient => consumer(request).or_else(|_| client(request)),
    }
}

/// One accepted bearer token, optionally bound to server names.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Token {
    token: String,
    servers: Option<Vec<String>>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token(servers: {:?})", self.servers)
    }
}

/// A set of accepted bearer tokens. Debug output never shows them.
#[derive(Clone, Default)]
pub struct Tokens(Vec<Token>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} configured)", self.0.len())
    }
}

impl Tokens {
    /// Parses `"tok1,tok2"`; blanks are dropped.
    pub fn parse(list: &str) -> Self {
        let tokens = list.split(',').map(str::trim).filter(|t| !t.is_empty());
        Self(tokens.map(|t| Token { token: t.to_owned(), servers: None }).collect())
    }

    /// Parses consumer tokens, each optionally bound to servers: `"tok1:serverA|serverB,tok2"`
    /// (`tok1` may list, claim and report only for `serverA` and `serverB`; `tok2` for any).
    pub fn parse_bound(list: &str) -> Result<Self, String> {
        let mut tokens = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let token = match entry.split_once(':') {
                None => Token { token: entry.to_owned(), servers: None },
                Some((token, servers)) => {
                    let servers: Vec<String> = servers.split('|').map(|s| s.trim().to_owned()).collect();
                    for server in &servers {
                        vm_task_types::validate::check_server_name("server", server)
                            .map_err(|e| format!("CONSUMER_TOKENS: a token's server list: {e}"))?;
                    }
                    if token.trim().is_empty() {
                        return Err("CONSUMER_TOKENS: an entry binds servers to an empty token".into());
                    }
                    Token { token: token.trim().to_owned(), servers: Some(servers) }
                }
            };
            tokens.push(token);
        }
        Ok(Self(tokens))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// [`Tokens::check`] for handlers outside this crate (the durable dispatch mode's routes),
    /// and, with `server`, that a token bound to servers may act for it (403 otherwise). The
    /// refusal comes as the same error response the routes send.
    pub fn admit(&self, request: &Request, what: &str, server: Option<&str>) -> Result<(), crate::http::Response> {
        let token = self.check(request, what)?;
        if let Some(server) = server {
            Caller::Consumer { servers: token.servers.clone() }.check_server(server)?;
        }
        Ok(())
    }

    /// Checks the request's `Authorization: Bearer` header against every token, in constant
    /// time per token, and without stopping at the first match. Returns the matched token.
    pub(crate) fn check(&self, request: &Request, what: &str) -> Result<&Token, AppError> {
        if self.0.is_empty() {
            return Err(AppError::Unavailable(format!(
                "no {what} tokens are configured on this worker; set them with `wrangler secret put`"
            )));
        }
        let header = request.get_header("authorization").ok_or_else(|| {
            AppError::Unauthorized(format!("missing Authorization header; send `Authorization: Bearer <{what} token>`"))
        })?;
        let presented = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or_else(|| AppError::Unauthorized("Authorization header must use the Bearer scheme".into()))?;
        let mut matched = None;
        for token in &self.0 {
            if constant_time_eq(token.token.as_bytes(), presented.as_bytes()) && matched.is_none() {
                matched = Some(token);
            }
        }
        matched.ok_or_else(|| AppError::Unauthorized(format!("invalid {what} token")))
    }
}

/// Compares two byte strings in time that depends only on their lengths. Hashing first makes
/// the lengths equal, so not even the token's length leaks.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (ha, hb) = (Sha256::digest(a), Sha256::digest(b));
    ha.iter().zip(hb.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Origins allowed to call authenticated routes from a browser.
#[derive(Debug, Clone, Default)]
pub struct Cors {
    origins: Vec<String>,
}

impl Cors {
    pub fn parse(list: &str) -> Self {
        Self { origins: list.split(',').map(str::trim).filter(|o| !o.is_empty()).map(str::to_owned).collect() }
    }

    /// The `Access-Control-Allow-Origin` value for this request, if its origin is allowed.
    pub(crate) fn allow_origin(&self, request: &Request) -> Option<String> {
        let origin = request.get_header("origin")?;
        self.origins.iter().any(|o| o == origin || o == "*").then(|| origin.to_owned())
    }
}

/// HMAC-SHA256 (RFC 2104), written out because it is ten lines over `sha2`.
pub(crate) fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut block_key = [0u8; BLOCK];
    if key.len() > BLOCK {
        block_key[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block_key[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block_key.map(|k| k ^ byte);
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(message).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Wraps a KV cursor so that clients cannot hand KV a cursor it did not issue: `<hex cursor>.<mac>`.
pub fn sign_cursor(secret: &[u8], kv_cursor: &str) -> String {
    let mac = hmac_sha256(secret, kv_cursor.as_bytes());
    format!("{}.{}", hex(kv_cursor.as_bytes()), hex(&mac[..16]))
}

/// The KV cursor inside a signed cursor, or a 400 naming the problem.
pub(crate) fn verify_cursor(secret: &[u8], cursor: &str) -> Result<String, AppError> {
    let invalid = || AppError::BadRequest {
        code: "invalid_cursor",
        message: "cursor is not one this API issued; pass back the `cursor` of a previous page".into(),
        field: Some("cursor".into()),
    };
    let (body_hex, mac_hex) = cursor.split_once('.').ok_or_else(invalid)?;
    let body = unhex(body_hex).ok_or_else(invalid)?;
    let expected = hmac_sha256(secret, &body);
    if !constant_time_eq(hex(&expected[..16]).as_bytes(), mac_hex.as_bytes()) {
        return Err(invalid());
    }
    String::from_utf8(body).map_err(|_| invalid())
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// A task on another server than the one named is not found there (as the durable mode's
/// object of that server answers).
pub(crate) fn on_named_server(task: &vm_task_types::Task, named: Option<&str>) -> Result<(), AppError> {
    match named {
        Some(server) if server != task.target_server => {
            Err(AppError::NotFound(format!("task {} is not on server {server:?}", task.id)))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_accept_any_configured_one_and_refuse_the_rest() {
        let tokens = Tokens::parse(" old-token , new-token ,");
        let ok = |t: &str| tokens.check(&Request::new("GET", "/").bearer(t), "client").map(|_| ());
        ok("old-token").unwrap();
        ok("new-token").unwrap();
        assert_eq!(ok("new-token-x").unwrap_err().status(), 401);
        assert_eq!(ok("").unwrap_err().status(), 401);
        let missing = tokens.check(&Request::new("GET", "/"), "client").unwrap_err();
        assert!(missing.to_string().contains("missing Authorization"));
        let basic = tokens.check(&Request::new("GET", "/").header("authorization", "Basic abc"), "client");
        assert!(basic.unwrap_err().to_string().contains("Bearer"));
        assert!(!format!("{tokens:?}").contains("token"), "Debug must not show tokens");
    }

    #[test]
    fn consumer_tokens_can_be_bound_to_servers() {
        let tokens = Tokens::parse_bound("tok1:server-a|server-b, tok2").unwrap();
        let caller =
            |t: &str| authorize(Auth::Consumer, &Request::new("GET", "/").bearer(t), &Tokens::default(), &tokens);
        let bound = caller("tok1").unwrap();
        bound.check_server("server-b").unwrap();
        assert_eq!(bound.check_server("server-c").unwrap_err().status(), 403);
        assert_eq!(bound.check_unbound("the sweep").unwrap_err().status(), 403);
        let free = caller("tok2").unwrap();
        free.check_server("server-c").unwrap();
        assert_eq!(caller("tok1:server-a|server-b").unwrap_err().status(), 401, "the binding is not the token");
        assert!(Tokens::parse_bound("tok:bad/name").unwrap_err().contains("CONSUMER_TOKENS"));
    }

    #[test]
    fn no_configured_tokens_fails_closed() {
        let err = Tokens::parse("").check(&Request::new("GET", "/").bearer("x"), "client").unwrap_err();
        assert_eq!(err.status(), 503);
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(hex(&mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn cursors_round_trip_and_forgeries_are_refused() {
        let signed = sign_cursor(b"secret", "kv-cursor-123");
        assert_eq!(verify_cursor(b"secret", &signed).unwrap(), "kv-cursor-123");
        for forged in ["kv-cursor-123", "abc", &signed.replace('.', ""), &format!("00{signed}")] {
            assert_eq!(verify_cursor(b"secret", forged).unwrap_err().status(), 400, "{forged}");
        }
        assert!(verify_cursor(b"other", &signed).is_err());
    }

    #[test]
    fn cors_allows_only_configured_origins() {
        let cors = Cors::parse("https://console.example.com");
        let from = |o: &str| cors.allow_origin(&Request::new("GET", "/").header("origin", o));
        assert_eq!(from("https://console.example.com").as_deref(), Some("https://console.example.com"));
        assert_eq!(from("https://evil.example.com"), None);
    }
}
