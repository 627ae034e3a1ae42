//! Helpers shared by the simulator's integration tests: a spawned simulator plus raw HTTP.

#![allow(dead_code)]

use arrakis_sim::{spawn, SimConfig, SimHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct Sim {
    pub h: SimHandle,
    http: reqwest::Client,
}

#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub content_type: Option<String>,
    pub location: Option<String>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// Asserts a handler error: status, JSON content type and the exact Go-encoded body.
    #[track_caller]
    pub fn assert_error(&self, status: u16, message: &str) {
        assert_eq!((self.status, self.body.as_str()), (status, error_body(message).as_str()), "unexpected response");
        assert_eq!(self.content_type.as_deref(), Some("application/json"));
    }
}

pub fn error_body(message: &str) -> String {
    format!("{{\"error\":{{\"message\":{}}}}}\n", serde_json::to_string(message).unwrap())
}

impl Sim {
    /// A simulator with fast test timings and a stable list order.
    pub async fn new() -> Self {
        Self::with(SimConfig::for_tests().with_shuffle_list(false)).await
    }

    pub async fn with(config: SimConfig) -> Self {
        let h = spawn(config).await;
        let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        Self { h, http }
    }

    pub async fn req(&self, method: &str, path: &str, body: Option<&str>) -> Resp {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, format!("{}{}", self.h.url(), path));
        if let Some(body) = body {
            req = req.body(body.to_string());
        }
        let resp = req.send().await.unwrap();
        let header =
            |name| resp.headers().get(name).map(|v: &reqwest::header::HeaderValue| v.to_str().unwrap().to_string());
        let content_type = header(reqwest::header::CONTENT_TYPE);
        let location = header(reqwest::header::LOCATION);
        let status = resp.status().as_u16();
        Resp { status, content_type, location, body: resp.text().await.unwrap() }
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.req("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: &str) -> Resp {
        self.req("POST", path, Some(body)).await
    }

    pub async fn patch(&self, name: &str, status: &str) -> Resp {
        self.req("PATCH", &format!("/v1/vms/{name}"), Some(&format!("{{\"status\":\"{status}\"}}"))).await
    }

    pub async fn delete(&self, path: &str) -> Resp {
        self.req("DELETE", path, None).await
    }

    pub async fn start(&self, name: &str) -> Resp {
        self.post("/v1/vms", &format!("{{\"vmName\":\"{name}\"}}")).await
    }

    pub async fn cmd(&self, name: &str, cmd: &str) -> Resp {
        let body = serde_json::json!({ "cmd": cmd }).to_string();
        self.post(&format!("/v1/vms/{name}/cmd"), &body).await
    }

    /// The VM's status via GET, or `None` when it does not exist.
    pub async fn status_of(&self, name: &str) -> Option<String> {
        let r = self.get(&format!("/v1/vms/{name}")).await;
        (r.status == 200).then(|| r.json()["status"].as_str().unwrap().to_string())
    }

    /// Sends raw bytes (for paths a URL library would normalise) and returns the raw response.
    pub async fn raw(&self, request_line: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(self.h.addr).await.unwrap();
        let request = format!("{request_line}\r\nHost: sim\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }
}
