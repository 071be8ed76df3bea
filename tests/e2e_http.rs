//! The public HTTP(S) entry point end to end: curl, a WebSocket client and headless Chromium
//! reach real web services (Python's http.server, `websockets`) behind an agent through
//! `/~~name`, over keep-alive connections, HTTPS with SNI certificates, and each error answer.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

const PW: &str = "http-test-service-password";
const SUPPORT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support");

/// A Python helper process that prints {"port": N} when it listens; killed on drop.
struct Helper {
    child: Child,
    addr: SocketAddr,
}

impl Helper {
    fn start(script: &str, args: &[&str]) -> Helper {
        let mut child = Command::new("python3")
            .arg(format!("{SUPPORT}/{script}"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        // The helper prints its port right after binding; a dead helper gives EOF.
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("{script} did not start ({e}): {line:?}"));
        let port = v["port"].as_u64().unwrap() as u16;
        Helper {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// The web service of `tests/support/http_backend.py`, answering as `name`.
    fn web(name: &str) -> Helper {
        Helper::start("http_backend.py", &[name])
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One published service: name, its local address, extra keys for its gateway table.
struct Svc<'a> {
    name: &'a str,
    local: SocketAddr,
    gateway_keys: &'a str,
}

/// A gateway with an `[http]` section and an agent publishing `services`.
struct Setup {
    gw: RunningGateway,
    agent: Option<Proc>,
    http: Option<SocketAddr>,
    https: Option<SocketAddr>,
}

impl Setup {
    /// `http` is the body of the `[http]` section; `offline` services are configured on the
    /// gateway only.
    fn start(dir: &Dir, timers: &str, http: &str, services: &[Svc], offline: &[&str]) -> Setup {
        let mut gw =
            format!("listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\n{timers}\n[http]\n{http}\n");
        let mut agent = String::new();
        for s in services {
            gw.push_str(&format!(
                "\n[services.{}]\npassword = \"{PW}\"\n{}\n",
                s.name, s.gateway_keys
            ));
        }
        for name in offline {
            gw.push_str(&format!("\n[services.{name}]\npassword = \"{PW}\"\n"));
        }
        let conf = dir.write("gateway.toml", &gw);
        let gw = RunningGateway::start(&conf);
        let addr = |msg: &str| {
            let line = gw.proc.wait_for(msg, STARTUP, |l| message_is(l, msg));
            field(&line, "addr").unwrap().parse::<SocketAddr>().unwrap()
        };
        let http_addr = http
            .lines()
            .any(|l| l.starts_with("listen"))
            .then(|| addr("listening for HTTP clients"));
        let https_addr = http
            .contains("tls_listen")
            .then(|| addr("listening for HTTPS clients"));
        let agent = (!services.is_empty()).then(|| {
            for s in services {
                agent.push_str(&format!(
                    "\n[services.{}]\npassword = \"{PW}\"\nlocal = \"{}\"\n",
                    s.name, s.local
                ));
            }
            let conf = dir.write(
                "agent.toml",
                &format!(
                    "gateway = \"{}\"\nfingerprint = \"{}\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\nconnect_timeout = \"3s\"\n{agent}",
                    gw.listen, gw.fingerprint
                ),
            );
            let p = Proc::start("agent", &["agent", "-c", conf.to_str().unwrap()]);
            for s in services {
                gw.wait_registered(s.name, 1);
            }
            p
        });
        Setup {
            gw,
            agent,
            http: http_addr,
            https: https_addr,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http.unwrap())
    }
}

fn curl(args: &[&str]) -> Output {
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "60"])
        .args(args)
        .output()
        .expect("curl is not installed: scripts/test.sh installs it");
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn curl_text(args: &[&str]) -> String {
    String::from_utf8(curl(args).stdout).unwrap()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Sends raw bytes and reads until the gateway closes; returns what came back.
fn raw_exchange(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn curl_through_prefixes_keeps_alive_across_two_services() {
    let dir = Dir::new();
    let (alpha, beta, gamma) = (
        Helper::web("alpha"),
        Helper::web("beta"),
        Helper::web("gamma"),
    );
    let setup = Setup::start(
        &dir,
        FAST_TIMERS,
        "listen = \"127.0.0.1:0\"",
        &[
            Svc {
                name: "alpha",
                local: alpha.addr,
                gateway_keys: "",
            },
            Svc {
                name: "beta",
                local: beta.addr,
                gateway_keys: "http_prefix = \"/~~srvBACK\"",
            },
            // Data connections under TLS route the same way.
            Svc {
                name: "gamma",
                local: gamma.addr,
                gateway_keys: "data_tls = true",
            },
        ],
        &[],
    );
    let host = setup.http.unwrap().to_string();

    // Three requests to three services on one connection: curl reuses it.
    let out = curl(&[
        "-v",
        &setup.url("/~~alpha/whoami"),
        &setup.url("/~~srvBACK/whoami?x=1"),
        &setup.url("/~~gamma/whoami"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("Re-using existing connection").count(),
        2,
        "curl opened more than one connection:\n{stderr}"
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let answers: Vec<serde_json::Value> = text.split_inclusive('}').map(json).collect();
    assert_eq!(answers.len(), 3, "{text}");
    assert_eq!(answers[0]["service"], "alpha");
    assert_eq!(answers[0]["path"], "/whoami");
    assert_eq!(answers[0]["x-forwarded-prefix"], "/~~alpha");
    assert_eq!(answers[0]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(answers[0]["x-forwarded-proto"], "http");
    assert_eq!(answers[0]["x-forwarded-host"], host.as_str());
    assert_eq!(answers[1]["service"], "beta");
    assert_eq!(answers[1]["path"], "/whoami?x=1");
    assert_eq!(answers[1]["x-forwarded-prefix"], "/~~srvBACK");
    assert_eq!(answers[2]["service"], "gamma");

    // Pipelined: two requests in one write, answered in order on one connection.
    let both = format!(
        "GET /~~srvBACK/whoami HTTP/1.1\r\nHost: {host}\r\n\r\nGET /~~alpha/whoami HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    );
    let text = raw_exchange(
        setup.http.unwrap(),
        both.as_bytes(),
        Duration::from_secs(20),
    );
    let beta_at = text.find("\"service\": \"beta\"").expect(&text);
    let alpha_at = text.find("\"service\": \"alpha\"").expect(&text);
    assert!(beta_at < alpha_at, "{text}");
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");

    // A request target in absolute form (as proxies send them) is routed the same way.
    let v = json(&curl_text(&[
        "--request-target",
        &format!("http://{host}/~~alpha/whoami"),
        &setup.url("/"),
    ]));
    assert_eq!(
        (v["service"].as_str(), v["path"].as_str()),
        (Some("alpha"), Some("/whoami"))
    );

    // A chunked response comes through whole.
    let expect: String = (0..10).map(|i| format!("chunk-{i}\n")).collect();
    assert_eq!(curl_text(&[&setup.url("/~~alpha/chunked")]), expect);

    // A chunked upload arrives whole.
    let data = random_bytes(3 * 1024 * 1024 + 17, 4);
    let file = dir.path().join("chunked.bin");
    std::fs::write(&file, &data).unwrap();
    let answer = json(&curl_text(&[
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &format!("@{}", file.display()),
        &setup.url("/~~srvBACK/upload"),
    ]));
    assert_eq!(answer["service"], "beta");
    assert_eq!(answer["sha256"], sha256_hex(&data));
    assert_eq!(answer["len"], data.len());

    // Redirects to absolute paths and to the gateway's own URL stay under the prefix.
    let head = curl_text(&["-i", &setup.url("/~~alpha/redirect")]);
    assert!(head.contains("\r\nLocation: /~~alpha/whoami\r\n"), "{head}");
    let head = curl_text(&["-i", &setup.url("/~~alpha/redirect-abs")]);
    assert!(
        head.contains(&format!("\r\nLocation: http://{host}/~~alpha/whoami\r\n")),
        "{head}"
    );
    for path in ["/~~srvBACK/redirect", "/~~srvBACK/redirect-abs"] {
        let followed = json(&curl_text(&["-L", &setup.url(path)]));
        assert_eq!(followed["service"], "beta", "{path}");
        assert_eq!(followed["path"], "/whoami", "{path}");
    }

    // Absolute paths without a prefix follow the route cookie, or the Referer.
    let jar = dir.path().join("cookies");
    let jar = jar.to_str().unwrap();
    let head = curl_text(&["-i", "-c", jar, &setup.url("/~~gamma/whoami")]);
    assert!(
        head.contains("Set-Cookie: dialback_route=gamma; Path=/; HttpOnly; SameSite=Lax"),
        "{head}"
    );
    let by_cookie = json(&curl_text(&["-b", jar, &setup.url("/whoami")]));
    assert_eq!(by_cookie["service"], "gamma");
    assert_eq!(
        by_cookie["cookie"],
        serde_json::Value::Null,
        "the route cookie leaked"
    );
    let by_referer = json(&curl_text(&[
        "-b",
        jar,
        "-H",
        &format!("Referer: http://{host}/~~alpha/index.html"),
        &setup.url("/whoami"),
    ]));
    assert_eq!(by_referer["service"], "alpha");
}

#[test]
fn pythons_stock_http_server_behind_a_prefix() {
    let dir = Dir::new();
    let site = dir.path().join("site");
    std::fs::create_dir_all(site.join("docs")).unwrap();
    std::fs::write(site.join("docs/index.html"), "<h1>docs</h1>\n").unwrap();
    let blob = random_bytes(5 * 1024 * 1024 + 3, 21);
    std::fs::write(site.join("blob.bin"), &blob).unwrap();
    // HTTP/1.0, one request per connection, no keep-alive: the gateway must close after each
    // response and the next request gets a fresh data connection.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let server = Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .current_dir(&site)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let local = SocketAddr::from(([127, 0, 0, 1], port));
    // Killed on drop, also when an assertion fails.
    let _server = Helper {
        child: server,
        addr: local,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(local).is_err() {
        assert!(Instant::now() < deadline, "http.server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let setup = Setup::start(
        &dir,
        FAST_TIMERS,
        "listen = \"127.0.0.1:0\"",
        &[Svc {
            name: "files",
            local,
            gateway_keys: "",
        }],
        &[],
    );
    let out = curl(&[&setup.url("/~~files/blob.bin")]);
    assert_eq!(out.stdout.len(), blob.len());
    assert!(out.stdout == blob, "the file changed on the way");
    // The directory redirect (an absolute path) comes back under the prefix and is followed.
    let head = curl_text(&["-i", &setup.url("/~~files/docs")]);
    assert!(head.starts_with("HTTP/1.0 301"), "{head}");
    assert!(head.contains("\r\nLocation: /~~files/docs/\r\n"), "{head}");
    assert_eq!(
        curl_text(&["-L", &setup.url("/~~files/docs")]),
        "<h1>docs</h1>\n"
    );
    // HEAD has no body, whatever Content-Length says.
    let head = curl_text(&["-I", &setup.url("/~~files/blob.bin")]);
    assert!(
        head.contains(&format!("Content-Length: {}", blob.len())),
        "{head}"
    );
    // A conditional request gets its 304 without a body.
    let code = curl_text(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "If-Modified-Since: Fri, 01 Jan 2100 00:00:00 GMT",
        &setup.url("/~~files/blob.bin"),
    ]);
    assert_eq!(code, "304");
}

/// Reads one response with a Content-Length body from `s`; `None` at EOF before its head.
fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(u16, Vec<u8>)> {
    let mut chunk = [0u8; 16 * 1024];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).unwrap();
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    while buf.len() < end + len {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "EOF in a response body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[end..end + len].to_vec();
    buf.drain(..end + len);
    Some((status_of(&head), body))
}

#[test]
fn kept_alive_connections_carry_hundreds_of_requests() {
    let dir = Dir::new();
    // Services that answer at once: a response can then be complete before the gateway has
    // noticed that the request (without body) was fully sent.
    let alpha = Helper::start("fast_http.py", &["alpha"]);
    let beta = Helper::start("fast_http.py", &["beta"]);
    let setup = Setup::start(
        &dir,
        FAST_TIMERS,
        "listen = \"127.0.0.1:0\"",
        &[
            Svc {
                name: "alpha",
                local: alpha.addr,
                gateway_keys: "",
            },
            Svc {
                name: "beta",
                local: beta.addr,
                gateway_keys: "",
            },
        ],
        &[],
    );
    let addr = setup.http.unwrap();
    let clients: Vec<_> = (0..4)
        .map(|k| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_nodelay(true).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut buf = Vec::new();
                // One at a time, then pipelined in pairs; mostly one service, sometimes the
                // other; HTTP/1.0 keep-alive requests too. The connection stays open throughout.
                for i in 0..300 {
                    let service = if (i + k) % 50 == 49 { "beta" } else { "alpha" };
                    let request = if i % 7 == 0 {
                        format!("GET /~~{service}/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                    } else {
                        format!("GET /~~{service}/ HTTP/1.1\r\nHost: gw\r\n\r\n")
                    };
                    let pipelined = i % 3 == 0;
                    let wire = if pipelined {
                        request.repeat(2)
                    } else {
                        request
                    };
                    s.write_all(wire.as_bytes()).unwrap();
                    for _ in 0..(1 + usize::from(pipelined)) {
                        let (status, body) = read_response(&mut s, &mut buf).unwrap_or_else(|| {
                            panic!(
                                "client {k}: the gateway closed the connection after {i} requests"
                            )
                        });
                        assert_eq!(status, 200);
                        assert_eq!(
                            json(std::str::from_utf8(&body).unwrap())["message"],
                            format!("hello from {service}")
                        );
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
}

#[test]
fn large_upload_and_download_keep_their_checksums() {
    let dir = Dir::new();
    let web = Helper::web("bulk");
    let setup = Setup::start(
        &dir,
        FAST_TIMERS,
        "listen = \"127.0.0.1:0\"",
        &[Svc {
            name: "bulk",
            local: web.addr,
            gateway_keys: "",
        }],
        &[],
    );
    let data = random_bytes(64 * 1024 * 1024, 11);
    let file = dir.path().join("upload.bin");
    std::fs::write(&file, &data).unwrap();
    let answer = json(&curl_text(&[
        "--data-binary",
        &format!("@{}", file.display()),
        &setup.url("/~~bulk/upload"),
    ]));
    assert_eq!(answer["len"], data.len());
    assert_eq!(answer["sha256"], sha256_hex(&data));

    let n = 96 * 1024 * 1024;
    let out = curl(&[
        "-D",
        "-",
        &setup.url(&format!("/~~bulk/download?n={n}&seed=5")),
    ]);
    let split = out
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap()
        + 4;
    let head = String::from_utf8_lossy(&out.stdout[..split]).to_lowercase();
    let body = &out.stdout[split..];
    assert_eq!(body.len(), n);
    let want = head
        .lines()
        .find_map(|l| l.strip_prefix("x-content-sha256: "))
        .expect("no checksum header")
        .trim()
        .to_owned();
    assert_eq!(sha256_hex(body), want);
}

#[test]
fn websocket_echo_through_the_prefix() {
    let dir = Dir::new();
    let ws = Helper::start("ws_echo.py", &[]);
    let setup = Setup::start(
        &dir,
        FAST_TIMERS,
        "listen = \"127.0.0.1:0\"",
        &[Svc {
            name: "ws",
            local: ws.addr,
            gateway_keys: "",
        }],
        &[],
    );
    let url = format!("ws://{}/~~ws/echo?room=1", setup.http.unwrap());
    let out = Command::new("python3")
        .arg(format!("{SUPPORT}/ws_client.py"))
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "websocket client failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(report["ok"], true);
    // The service saw the path without the prefix.
    assert_eq!(report["path"], "path:/echo?room=1");
    assert_eq!(report["messages"], 55);
    setup
        .gw
        .proc
        .wait_for("upgrade logged", Duration::from_secs(10), |l| {
            message_is(l, "HTTP connection upgraded; relaying bytes")
        });
}

#[test]
fn chromium_loads_a_page_whose_assets_use_absolute_paths() {
    let dir = Dir::new();
    let web = Helper::web("portal");
    let setup = Setup::start(
        &dir,
        FAST_TIMERS,
        "listen = \"127.0.0.1:0\"",
        &[Svc {
            name: "portal",
            local: web.addr,
            gateway_keys: "http_prefix = \"/~~srvBACK\"",
        }],
        &[],
    );
    let url = setup.url("/~~srvBACK/");
    let chromium = Chromium::new(&dir);
    let (dom, log) = chromium.dump_dom(&url);
    for (what, attr) in [
        ("the script", "data-js=\"ok\""),
        ("the stylesheet", "data-css=\"ok\""),
        ("the image", "data-img=\"ok\""),
        ("the API call", "data-api=\"ok\""),
    ] {
        assert!(
            dom.contains(attr),
            "{what} did not load through the prefix ({attr} missing):\n{dom}\n{log}"
        );
    }
    assert!(dom.contains("api: hello from portal"), "{dom}");
    // The service saw every asset at its own absolute path.
    let seen = curl_text(&[&format!("http://{}/requests", web.addr)]);
    for path in [
        "/",
        "/css/app.css",
        "/js/app.js",
        "/img/logo.svg",
        "/api/data",
    ] {
        assert!(
            seen.contains(&format!("\"{path}\"")),
            "{path} never reached the service: {seen}"
        );
    }

    chromium.screenshot(&url, "http-prefix-page.png", "900,600");
}

#[test]
fn every_error_gets_its_status() {
    let dir = Dir::new();
    let web = Helper::web("up");
    let timers = format!("{FAST_TIMERS}admin_listen = \"127.0.0.1:0\"\n");
    let setup = Setup::start(
        &dir,
        &timers,
        "listen = \"127.0.0.1:0\"\nhead_timeout = \"1s\"\nmax_head = 4096",
        &[Svc {
            name: "up",
            local: web.addr,
            gateway_keys: "",
        }],
        &["down"],
    );
    let addr = setup.http.unwrap();
    let get = |path: &str, extra: &str| {
        raw_exchange(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: gw\r\n{extra}Connection: close\r\n\r\n")
                .as_bytes(),
            Duration::from_secs(20),
        )
    };
    assert_eq!(status_of(&get("/~~up/whoami", "")), 200);

    let r = get("/~~nobody/", "");
    assert_eq!(status_of(&r), 404, "{r}");
    assert!(r.contains("no service is published at /~~nobody"), "{r}");
    let r = get("/favicon.ico", "");
    assert_eq!(status_of(&r), 404, "{r}");
    // Refused with 2 MiB of request body unread: the answer still arrives (no reset).
    let body = dir.path().join("body.bin");
    std::fs::write(&body, random_bytes(2 * 1024 * 1024, 8)).unwrap();
    let code = curl_text(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Expect:",
        "--data-binary",
        &format!("@{}", body.display()),
        &format!("http://{addr}/~~nobody/upload"),
    ]);
    assert_eq!(code, "404");

    let r = get("/~~down/", "");
    assert_eq!(status_of(&r), 502, "{r}");
    assert!(r.contains("the agent of service down is offline"), "{r}");

    let r = get("/~~up/", &format!("X-Big: {}\r\n", "a".repeat(5000)));
    assert_eq!(status_of(&r), 431, "{r}");

    let r = raw_exchange(
        addr,
        b"GET /~~up/ HTTP/1.1\r\nHost gw\r\n\r\n",
        Duration::from_secs(20),
    );
    assert_eq!(status_of(&r), 400, "{r}");
    let r = raw_exchange(
        addr,
        b"POST /~~up/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        Duration::from_secs(20),
    );
    assert_eq!(status_of(&r), 400, "{r}");

    // Slowloris: half a head, then nothing. The answer comes after head_timeout, not never.
    let started = Instant::now();
    let r = raw_exchange(
        addr,
        b"GET /~~up/ HTTP/1.1\r\nHost: gw\r\n",
        Duration::from_secs(20),
    );
    assert_eq!(status_of(&r), 408, "{r}");
    assert!(started.elapsed() < Duration::from_secs(15));
    // A connection that sends nothing at all is answered the same way.
    let r = raw_exchange(addr, b"", Duration::from_secs(20));
    assert_eq!(status_of(&r), 408, "{r}");
    for status in [404, 502, 431, 400, 408] {
        setup
            .gw
            .proc
            .wait_for(&format!("{status} logged"), Duration::from_secs(5), |l| {
                message_contains(l, "HTTP request refused")
                    && field(l, "status").as_deref() == Some(&status.to_string())
            });
    }
    // Every answer is counted, by service where there was one.
    let admin = setup.gw.proc.wait_for("admin listener", STARTUP, |l| {
        message_is(l, "admin endpoint listening")
    });
    let metrics = curl_text(&[&format!(
        "http://{}/metrics",
        field(&admin, "addr").unwrap()
    )]);
    for line in [
        "dialback_gateway_http_responses_total{service=\"up\",code=\"200\"} 1",
        "dialback_gateway_http_responses_total{service=\"down\",code=\"502\"} 1",
        "dialback_gateway_http_unrouted_total{code=\"404\"} 3",
        "dialback_gateway_http_unrouted_total{code=\"400\"} 2",
        "dialback_gateway_http_unrouted_total{code=\"408\"} 2",
        "dialback_gateway_http_unrouted_total{code=\"431\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
}

#[test]
fn slow_agents_and_services_get_504_and_crowds_503_never_a_hang() {
    let dir = Dir::new();
    let web = Helper::web("frozen");
    // A service that accepts connections and never answers.
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mute_addr = mute.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in mute.incoming() {
            held.push(s);
        }
    });
    // Long liveness timers, a short token: the agent stays registered while it cannot dial.
    let timers = "heartbeat = \"10s\"\ndead_after = \"60s\"\ntoken_ttl = \"2s\"\nhandshake_timeout = \"3s\"\n";
    let mut setup = Setup::start(
        &dir,
        timers,
        "listen = \"127.0.0.1:0\"\nresponse_timeout = \"2s\"",
        &[
            // No pooled connections and one waiting client at most.
            Svc {
                name: "frozen",
                local: web.addr,
                gateway_keys: "pool = 0\nmax_pending = 1",
            },
            Svc {
                name: "mute",
                local: mute_addr,
                gateway_keys: "",
            },
        ],
        &[],
    );
    let refused = |status: &str, reason: &str| {
        setup
            .gw
            .proc
            .wait_for(&format!("{status} logged"), Duration::from_secs(5), |l| {
                message_contains(l, "HTTP request refused")
                    && field(l, "status").as_deref() == Some(status)
                    && message_contains(l, reason)
            });
    };
    let code = |url: &str| {
        let out = curl(&["-o", "/dev/null", "-w", "%{http_code}", url]);
        String::from_utf8(out.stdout).unwrap()
    };

    // The service never answers: 504 after response_timeout.
    let started = Instant::now();
    assert_eq!(code(&setup.url("/~~mute/")), "504");
    assert!(started.elapsed() < Duration::from_secs(10));
    refused("504", "service mute did not answer within 2s");

    // The agent is frozen: no data connection comes, 504 after token_ttl; meanwhile more
    // clients than max_pending are turned away at once with 503.
    let url = setup.url("/~~frozen/whoami");
    assert_eq!(json(&curl_text(&[&url]))["service"], "frozen");
    let agent = setup.agent.as_mut().unwrap();
    agent.signal("STOP");
    let started = Instant::now();
    let crowd: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let out = curl(&["-o", "/dev/null", "-w", "%{http_code}", &url]);
                String::from_utf8(out.stdout).unwrap()
            })
        })
        .collect();
    let codes: Vec<String> = crowd.into_iter().map(|t| t.join().unwrap()).collect();
    let elapsed = started.elapsed();
    agent.signal("CONT");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert!(codes.iter().all(|c| c == "503" || c == "504"), "{codes:?}");
    assert!(codes.iter().any(|c| c == "504"), "{codes:?}");
    assert!(codes.iter().any(|c| c == "503"), "{codes:?}");
    refused(
        "504",
        "no data connection from the agent of service frozen within",
    );
    refused("503", "service frozen is overloaded");
}

/// A test CA and leaf certificates made with the openssl command line.
fn make_certs(dir: &Path, names: &[&str]) -> PathBuf {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=dialback test CA",
        ],
    );
    for name in names {
        leaf_cert(dir, name, name);
    }
    dir.join("ca.crt")
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `NAME.crt` and `NAME.key` in `dir` for DNS name `name`, with subject `CN=cn`, signed by the
/// CA of [`make_certs`].
fn leaf_cert(dir: &Path, name: &str, cn: &str) {
    let run = |args: &[&str]| openssl(dir, args);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &format!("{name}.key"),
        "-out",
        &format!("{name}.csr"),
        "-subj",
        &format!("/CN={cn}"),
    ]);
    std::fs::write(
        dir.join(format!("{name}.ext")),
        format!("subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\n"),
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        &format!("{name}.csr"),
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        &format!("{name}.crt"),
        "-days",
        "2",
        "-extfile",
        &format!("{name}.ext"),
    ]);
}

#[test]
fn https_serves_two_names_with_their_own_certificates() {
    let dir = Dir::new();
    let ca = make_certs(dir.path(), &["one.test", "two.test"]);
    let (alpha, beta, ws) = (
        Helper::web("alpha"),
        Helper::web("beta"),
        Helper::start("ws_echo.py", &[]),
    );
    let setup = Setup::start(
        &dir,
        FAST_TIMERS,
        "tls_listen = \"127.0.0.1:0\"\ncert = \"one.test.crt\"\nkey = \"one.test.key\"\n\n[[http.certs]]\nnames = [\"two.test\"]\ncert = \"two.test.crt\"\nkey = \"two.test.key\"",
        &[
            Svc { name: "alpha", local: alpha.addr, gateway_keys: "" },
            // Host routing: every path of two.test goes to beta, untouched.
            Svc { name: "beta", local: beta.addr, gateway_keys: "hosts = [\"two.test\"]" },
            // TLS on both sides of the gateway once the WebSocket is upgraded.
            Svc { name: "ws", local: ws.addr, gateway_keys: "data_tls = true" },
        ],
        &[],
    );
    let port = setup.https.unwrap().port();
    let ca = ca.to_str().unwrap();
    let https = |name: &str, path: &str| {
        let resolve = format!("{name}:{port}:127.0.0.1");
        let out = curl(&[
            "-v",
            "--cacert",
            ca,
            "--resolve",
            &resolve,
            &format!("https://{name}:{port}{path}"),
        ]);
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (body, log) = https("one.test", "/~~alpha/whoami");
    assert!(log.contains("subject: CN=one.test"), "{log}");
    let v = json(&body);
    assert_eq!(v["service"], "alpha");
    assert_eq!(v["x-forwarded-proto"], "https");
    assert_eq!(v["x-forwarded-host"], format!("one.test:{port}"));
    assert!(
        log.to_lowercase()
            .contains("set-cookie: dialback_route=alpha; path=/; httponly; samesite=lax; secure"),
        "{log}"
    );

    // Plain HTTP on the HTTPS port gets a readable answer, not a failed handshake.
    let r = raw_exchange(
        setup.https.unwrap(),
        b"GET /~~alpha/ HTTP/1.1\r\nHost: one.test\r\n\r\n",
        Duration::from_secs(10),
    );
    assert_eq!(status_of(&r), 400, "{r}");
    assert!(r.contains("this port speaks HTTPS"), "{r}");

    let (body, log) = https("two.test", "/whoami");
    assert!(log.contains("subject: CN=two.test"), "{log}");
    let v = json(&body);
    assert_eq!(v["service"], "beta");
    assert_eq!(v["path"], "/whoami");
    assert_eq!(v["x-forwarded-prefix"], serde_json::Value::Null);

    // A WebSocket under TLS (wss), relayed after the 101 like a plain one; the client
    // connects to the address and asks for one.test by SNI.
    let out = Command::new("python3")
        .arg(format!("{SUPPORT}/ws_client.py"))
        .arg(format!("wss://127.0.0.1:{port}/~~ws/secure"))
        .arg(ca)
        .arg("one.test")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wss client failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        json(String::from_utf8_lossy(&out.stdout).trim())["path"],
        "path:/secure"
    );
}

/// A service that answers the first half of its body at once and the second when `release`
/// says so; every request gets `HTTP/1.1 200` with a 10-byte body "hello" + "world".
fn half_then_wait(release: std::sync::mpsc::Receiver<()>) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let release = std::sync::Arc::new(std::sync::Mutex::new(release));
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let release = release.clone();
            std::thread::spawn(move || {
                if read_request_head(&mut s).is_none() {
                    return;
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello");
                let _ = release
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(30));
                let _ = s.write_all(b"world");
            });
        }
    });
    addr
}

#[test]
fn sigterm_lets_a_response_in_flight_finish_and_does_not_wait_for_idle_connections() {
    let dir = Dir::new();
    let (release, wait) = std::sync::mpsc::channel();
    let slow = half_then_wait(wait);
    let mut s = Setup::start(
        &dir,
        FAST_TIMERS,
        "listen = \"127.0.0.1:0\"\n",
        &[Svc {
            name: "slow",
            local: slow,
            gateway_keys: "",
        }],
        &[],
    );
    let http = s.http.unwrap();
    let request = b"GET /~~slow/ HTTP/1.1\r\nHost: gw\r\n\r\n";

    // An idle kept-alive connection: one whole exchange, then nothing.
    let mut idle = TcpStream::connect(http).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    idle.write_all(request).unwrap();
    release.send(()).unwrap();
    let mut buf = Vec::new();
    let (status, body) = read_response(&mut idle, &mut buf).expect("first response");
    assert_eq!((status, body.as_slice()), (200, &b"helloworld"[..]));

    // A response in flight: half of its body is here when the gateway is told to stop.
    let mut busy = TcpStream::connect(http).unwrap();
    busy.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    busy.write_all(request).unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 256];
    while !got.ends_with(b"hello") {
        let n = busy.read(&mut b).unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&b[..n]);
    }
    s.gw.proc.signal("TERM");
    let line =
        s.gw.proc
            .wait_for("drain start", Duration::from_secs(20), |l| {
                message_contains(l, "shutting down: no new clients")
            });
    assert_eq!(field(&line, "active").as_deref(), Some("1"), "{line}");

    // The response finishes during the drain; then the gateway exits without waiting for
    // the idle connection.
    release.send(()).unwrap();
    while !got.ends_with(b"helloworld") {
        let n = busy.read(&mut b).unwrap();
        assert!(
            n > 0,
            "cut during the drain: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&b[..n]);
    }
    s.gw.proc.wait_for("drained", Duration::from_secs(20), |l| {
        message_is(l, "drained: every connection finished")
    });
    assert_eq!(s.gw.proc.wait_exit(Duration::from_secs(20)), Some(0));
    drop(s.agent.take());
    drop(idle);
}

#[test]
fn a_renewed_certificate_is_served_after_sighup() {
    let dir = Dir::new();
    let ca = make_certs(dir.path(), &["one.test"]);
    let alpha = Helper::web("alpha");
    let setup = Setup::start(
        &dir,
        FAST_TIMERS,
        "tls_listen = \"127.0.0.1:0\"\ncert = \"one.test.crt\"\nkey = \"one.test.key\"",
        &[Svc {
            name: "alpha",
            local: alpha.addr,
            gateway_keys: "",
        }],
        &[],
    );
    let port = setup.https.unwrap().port();
    let subject = || {
        let resolve = format!("one.test:{port}:127.0.0.1");
        let out = curl(&[
            "-v",
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
            &resolve,
            &format!("https://one.test:{port}/~~alpha/whoami"),
        ]);
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            json(&String::from_utf8(out.stdout).unwrap())["service"],
            "alpha",
            "{log}"
        );
        log.lines()
            .find_map(|l| l.split_once(" subject: ").map(|(_, s)| s.trim().to_owned()))
            .unwrap_or_else(|| panic!("no subject in {log}"))
    };
    assert_eq!(subject(), "CN=one.test");

    // Renewal: a new key and certificate in the same files, then SIGHUP.
    leaf_cert(dir.path(), "one.test", "one.test renewed");
    setup.gw.proc.signal("HUP");
    setup
        .gw
        .proc
        .wait_for("reloaded", Duration::from_secs(20), |l| {
            message_is(l, "configuration reloaded")
        });
    assert_eq!(subject(), "CN=one.test renewed");
}
