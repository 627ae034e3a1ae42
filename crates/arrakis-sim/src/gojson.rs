//! Request-body decoding that fails the way the real server's Go code does.
//!
//! The server reads only the first JSON value of a body with `encoding/json`. POST /v1/vms,
//! PATCH and snapshots decode leniently (unknown keys ignored, keys matched case-insensitively);
//! cmd and files go through openapi-generator's strict `UnmarshalJSON` (required keys checked
//! by exact name first, then unknown keys rejected). The error texts here are what follows
//! `Invalid request format: ` in the 400 body. Objects keep their key order so the first error
//! in document order wins, as in Go.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// A JSON value whose objects keep key order and duplicates.
#[derive(Debug, Clone, PartialEq)]
pub enum J {
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    Array(Vec<J>),
    Object(Vec<(String, J)>),
}

impl J {
    /// Go's name for the JSON kind in `cannot unmarshal <kind> into …`.
    fn kind(&self) -> &'static str {
        match self {
            J::Null => "null",
            J::Bool(_) => "bool",
            J::Number(_) => "number",
            J::String(_) => "string",
            J::Array(_) => "array",
            J::Object(_) => "object",
        }
    }
}

impl<'de> Deserialize<'de> for J {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = J;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E>(self) -> Result<J, E> {
                Ok(J::Null)
            }
            fn visit_none<E>(self) -> Result<J, E> {
                Ok(J::Null)
            }
            fn visit_bool<E>(self, v: bool) -> Result<J, E> {
                Ok(J::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<J, E> {
                Ok(J::Number(v as f64))
            }
            fn visit_u64<E>(self, v: u64) -> Result<J, E> {
                Ok(J::Number(v as f64))
            }
            fn visit_f64<E>(self, v: f64) -> Result<J, E> {
                Ok(J::Number(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<J, E> {
                Ok(J::String(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<J, E> {
                Ok(J::String(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<J, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(J::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<J, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, J>()? {
                    entries.push((k, v));
                }
                Ok(J::Object(entries))
            }
        }
        d.deserialize_any(V)
    }
}

/// Reads the first JSON value of `body`, ignoring whatever follows, like `json.Decoder.Decode`.
pub fn decode_first(body: &[u8]) -> Result<J, String> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err("EOF".into());
    }
    let mut stream = serde_json::Deserializer::from_slice(body).into_iter::<J>();
    match stream.next() {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) if e.is_eof() => Err("unexpected EOF".into()),
        Some(Err(e)) => Err(go_syntax_error(body, &e)),
        None => Err("EOF".into()),
    }
}

/// Approximates Go's `invalid character 'x' …` from serde's line and column.
fn go_syntax_error(body: &[u8], e: &serde_json::Error) -> String {
    let text = String::from_utf8_lossy(body);
    let line = text.lines().nth(e.line().saturating_sub(1)).unwrap_or_default();
    let offending = line.chars().nth(e.column().saturating_sub(1));
    match offending {
        Some(c) => format!("invalid character '{c}' looking for beginning of value"),
        None => "unexpected EOF".into(),
    }
}

/// The expected Go type of one field, for type-mismatch messages and checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    String,
    Bool,
    /// `files`: a list of strict `{path, content}` objects.
    FileList,
}

impl FieldType {
    fn go_name(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Bool => "bool",
            FieldType::FileList => "[]serverapi.VmFileUploadRequestFilesInner",
        }
    }

    fn accepts(self, v: &J) -> bool {
        matches!(
            (self, v),
            (_, J::Null)
                | (FieldType::String, J::String(_))
                | (FieldType::Bool, J::Bool(_))
                | (FieldType::FileList, J::Array(_))
        )
    }
}

/// One field of a Go struct: JSON key and type.
pub type Field = (&'static str, FieldType);

/// The decoded fields of one object, by declared key; `None` when absent or null.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Fields(Vec<(&'static str, J)>);

impl Fields {
    pub fn get(&self, key: &str) -> Option<&J> {
        self.0.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| v).filter(|v| **v != J::Null)
    }

    pub fn string(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(J::String(s)) => Some(s),
            _ => None,
        }
    }

    pub fn bool(&self, key: &str) -> Option<bool> {
        match self.get(key) {
            Some(J::Bool(b)) => Some(*b),
            _ => None,
        }
    }
}

/// Go's default decoding into a struct: unknown keys ignored, keys matched case-insensitively,
/// and a type mismatch reported (the first one) after the whole object is read.
pub fn lenient(value: &J, go_struct: &str, fields: &[Field]) -> Result<Fields, String> {
    let entries = match value {
        J::Null => return Ok(Fields::default()),
        J::Object(entries) => entries,
        other => return Err(format!("json: cannot unmarshal {} into Go value of type {go_struct}", other.kind())),
    };
    let mut out = Fields::default();
    let mut first_error = None;
    for (key, v) in entries {
        let Some((name, ty)) = fields.iter().find(|(name, _)| name.eq_ignore_ascii_case(key)) else {
            continue;
        };
        if ty.accepts(v) {
            out.0.push((name, v.clone()));
        } else if first_error.is_none() {
            first_error = Some(type_error(v, go_struct, name, *ty));
        }
    }
    first_error.map_or(Ok(out), Err)
}

fn type_error(v: &J, go_struct: &str, field: &str, ty: FieldType) -> String {
    let short = go_struct.rsplit('.').next().unwrap_or(go_struct);
    format!("json: cannot unmarshal {} into Go struct field {short}.{field} of type {}", v.kind(), ty.go_name())
}

/// openapi-generator's strict `UnmarshalJSON`: the value must decode as a map, every required
/// key must be present under its exact name, then unknown keys are errors.
pub fn strict(value: &J, go_struct: &str, required: &[&str], fields: &[Field]) -> Result<Fields, String> {
    let entries: &[(String, J)] = match value {
        J::Null => &[],
        J::Object(entries) => entries,
        other => {
            return Err(format!(
                "json: cannot unmarshal {} into Go value of type map[string]interface {{}}",
                other.kind()
            ))
        }
    };
    for key in required {
        if !entries.iter().any(|(k, _)| k == key) {
            return Err(format!("no value given for required property {key}"));
        }
    }
    let mut out = Fields::default();
    for (key, v) in entries {
        let Some((name, ty)) = fields.iter().find(|(name, _)| name.eq_ignore_ascii_case(key)) else {
            return Err(format!("json: unknown field {}", go_quote(key)));
        };
        if !ty.accepts(v) {
            return Err(type_error(v, &format!("_{go_struct}"), name, *ty));
        }
        out.0.push((name, v.clone()));
    }
    Ok(out)
}

/// Go's `%q`: a double-quoted string with Go escapes (close enough for printable keys).
fn go_quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

/// Decodes the upload body: `{"files":[{"path","content"}]}`, all strict.
pub fn upload_files(value: &J) -> Result<Vec<(String, String)>, String> {
    let fields = strict(value, "VmFileUploadRequest", &["files"], &[("files", FieldType::FileList)])?;
    let Some(J::Array(items)) = fields.get("files") else {
        return Ok(Vec::new());
    };
    let mut files = Vec::new();
    for item in items {
        let entry = strict(
            item,
            "VmFileUploadRequestFilesInner",
            &["path", "content"],
            &[("path", FieldType::String), ("content", FieldType::String)],
        )?;
        files.push((
            entry.string("path").unwrap_or_default().to_string(),
            entry.string("content").unwrap_or_default().to_string(),
        ));
    }
    Ok(files)
}

/// Serialises a response the way Go's `json.Encoder` does: HTML-sensitive characters escaped
/// and a trailing newline. (Key order comes from the caller's struct field order.)
pub fn go_encode<T: serde::Serialize>(value: &T) -> String {
    let raw = serde_json::to_string(value).unwrap_or_else(|_| "{}".into());
    let mut out = String::with_capacity(raw.len() + 1);
    for c in raw.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            other => out.push(other),
        }
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CMD: &[Field] = &[("cmd", FieldType::String), ("blocking", FieldType::Bool)];

    fn cmd(body: &str) -> Result<Fields, String> {
        strict(&decode_first(body.as_bytes())?, "VmCommandRequest", &["cmd"], CMD)
    }

    #[test]
    fn decode_errors_read_like_go() {
        assert_eq!(decode_first(b"").unwrap_err(), "EOF");
        assert_eq!(decode_first(b"  \n").unwrap_err(), "EOF");
        assert_eq!(decode_first(b"{\"a\":").unwrap_err(), "unexpected EOF");
        assert!(decode_first(b"nope").unwrap_err().starts_with("invalid character 'o'"));
        // Only the first value counts.
        assert_eq!(decode_first(b"{} trailing").unwrap(), J::Object(vec![]));
    }

    #[test]
    fn strict_bodies() {
        assert_eq!(cmd(r#"{"cmd":"ls","x":1}"#).unwrap_err(), r#"json: unknown field "x""#);
        assert_eq!(cmd(r#"{"blocking":true}"#).unwrap_err(), "no value given for required property cmd");
        assert_eq!(cmd(r#"{"CMD":"ls"}"#).unwrap_err(), "no value given for required property cmd");
        assert_eq!(
            cmd(r#"{"cmd":1}"#).unwrap_err(),
            "json: cannot unmarshal number into Go struct field _VmCommandRequest.cmd of type string"
        );
        assert_eq!(
            cmd("[]").unwrap_err(),
            "json: cannot unmarshal array into Go value of type map[string]interface {}"
        );
        let ok = cmd(r#"{"cmd":"ls","Blocking":false}"#).unwrap();
        assert_eq!((ok.string("cmd"), ok.bool("blocking")), (Some("ls"), Some(false)));
        let files = |b: &str| upload_files(&decode_first(b.as_bytes()).unwrap());
        assert_eq!(files(r#"{"files":[{"path":"a"}]}"#).unwrap_err(), "no value given for required property content");
        assert_eq!(
            files(r#"{"files":[{"path":"a","content":"b","mode":1}]}"#).unwrap_err(),
            r#"json: unknown field "mode""#
        );
        assert_eq!(files(r#"{"files":null}"#).unwrap(), vec![]);
    }

    #[test]
    fn lenient_bodies() {
        let f = &[("vmName", FieldType::String)];
        let v = decode_first(br#"{"VMNAME":"a","other":1}"#).unwrap();
        assert_eq!(lenient(&v, "serverapi.StartVMRequest", f).unwrap().string("vmName"), Some("a"));
        let v = decode_first(br#"{"vmName":5}"#).unwrap();
        assert_eq!(
            lenient(&v, "serverapi.StartVMRequest", f).unwrap_err(),
            "json: cannot unmarshal number into Go struct field StartVMRequest.vmName of type string"
        );
    }

    #[test]
    fn encoding_escapes_html_characters() {
        #[derive(serde::Serialize)]
        struct O {
            output: &'static str,
        }
        assert_eq!(go_encode(&O { output: "<a&b>" }), "{\"output\":\"\\u003ca\\u0026b\\u003e\"}\n");
    }
}
