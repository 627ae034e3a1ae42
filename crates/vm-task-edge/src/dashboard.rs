//! The operator dashboard served at `GET /dashboard`: one self-contained page (HTML, CSS and
//! JS inlined, no external resource), compiled into the worker with `include_str!`.
//!
//! The page itself holds no data, so its route is open; every data call it makes carries the
//! client token the operator types in. It is served with a strict `Content-Security-Policy`
//! that allows exactly its one inline `<style>` and one inline `<script>` by their SHA-256, and
//! connections only to its own origin.

use sha2::{Digest, Sha256};

use crate::http::Response;

/// The page, as served.
pub const PAGE: &str = include_str!("dashboard/index.html");

/// The text between the first `<{tag}>` and the following `</{tag}>`.
fn inline_block<'a>(page: &'a str, tag: &str) -> &'a str {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let Some(start) = page.find(&open).map(|i| i + open.len()) else { return "" };
    let end = page[start..].find(&close).map_or(page.len(), |i| start + i);
    &page[start..end]
}

/// `'sha256-…'` of a block, as CSP writes a hash source.
fn hash_source(block: &str) -> String {
    format!("'sha256-{}'", base64(&Sha256::digest(block.as_bytes())))
}

/// The policy: nothing but the page's own inline style and script, fetches to its own origin.
pub fn content_security_policy() -> String {
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src 'self' data:; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash_source(inline_block(PAGE, "script")),
        hash_source(inline_block(PAGE, "style")),
    )
}

/// `GET /dashboard`.
pub(crate) fn response() -> Response {
    Response {
        status: 200,
        headers: vec![
            ("content-type".into(), "text/html; charset=utf-8".into()),
            ("content-security-policy".into(), content_security_policy()),
            ("x-content-type-options".into(), "nosniff".into()),
            ("referrer-policy".into(), "no-referrer".into()),
            ("cache-control".into(), "no-cache".into()),
        ],
        body: PAGE.as_bytes().to_vec(),
    }
}

/// Standard base64 with padding (RFC 4648 §4), the encoding CSP hashes use.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (input, expected) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE=")]
        {
            assert_eq!(base64(input.as_bytes()), expected);
        }
    }

    #[test]
    fn the_page_has_one_inline_script_and_style_and_loads_nothing_external() {
        assert_eq!(PAGE.matches("<script>").count(), 1, "exactly one inline script, hashed by the CSP");
        assert_eq!(PAGE.matches("<style>").count(), 1, "exactly one inline style, hashed by the CSP");
        assert!(!PAGE.contains("<script src"), "no external script");
        assert!(!PAGE.contains("http://") && !PAGE.contains("https://"), "no absolute URL: the page works offline");
        assert!(!PAGE.contains(" style=\""), "no inline style attribute: the CSP refuses them");
        let markup = PAGE.replace(inline_block(PAGE, "script"), "");
        for handler in ["onclick=", "onsubmit=", "onload=", "onchange=", "oninput="] {
            assert!(!markup.contains(handler), "inline handler {handler}: the CSP refuses them");
        }
        assert!(!inline_block(PAGE, "script").is_empty());
    }

    #[test]
    fn the_policy_allows_only_the_pages_own_blocks() {
        let csp = content_security_policy();
        assert!(csp.starts_with("default-src 'none'; script-src 'sha256-"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(csp.matches("'sha256-").count(), 2, "{csp}");
    }
}
