//! The dashboard at `/` in a real browser: headless Chromium (Debian's
//! `chromium`, which `scripts/test` installs) loads the page from a
//! running master, driven over the DevTools protocol; the test reads the
//! DOM, changes the herd's state from outside the page and sees it arrive
//! live (the page only listens to the event stream), clicks a button, and
//! saves a screenshot (`TASKHERD_SCREENSHOT=path` to keep it elsewhere,
//! as `docs/dashboard.png` is made).

use crate::support::http::{address_in, get, post};
use crate::support::Herd;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const TOKEN: &str = "dashboard-token";

/// Debian's `chromium`, or another name it goes by.
fn chromium() -> Option<String> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|name| {
            Command::new(name)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success())
        })
        .map(str::to_string)
}

/// A headless Chromium, killed (its whole process group) when dropped.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    /// Where its DevTools protocol listens.
    port: u16,
}

impl Browser {
    fn start(program: &str) -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let mut child = Command::new(program)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                "--window-size=1400,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start chromium");
        let (lines_tx, lines_rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        let port = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines_rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!("chromium did not listen; it said:\n{}", seen.join("\n"))
            });
            if let Some(rest) = line.split("DevTools listening on ws://").nth(1) {
                let address: SocketAddr = rest
                    .split('/')
                    .next()
                    .and_then(|a| a.parse().ok())
                    .expect("DevTools address");
                break address.port();
            }
            seen.push(line);
        };
        Browser {
            child,
            _profile: profile,
            port,
        }
    }

    /// A DevTools session on its first page.
    fn page(&self) -> Page {
        let address = SocketAddr::from(([127, 0, 0, 1], self.port));
        let targets = get(address, "/json/list", None).json();
        let url = targets
            .as_array()
            .and_then(|all| all.iter().find(|t| t["type"] == "page"))
            .and_then(|page| page["webSocketDebuggerUrl"].as_str())
            .unwrap_or_else(|| panic!("no page in {targets}"))
            .to_string();
        let stream = TcpStream::connect(address).expect("connect DevTools");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let (socket, _) = tungstenite::client(url.as_str(), stream).expect("DevTools websocket");
        Page { socket, next: 0 }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of the process group we made.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// One page, over the DevTools protocol.
struct Page {
    socket: tungstenite::WebSocket<TcpStream>,
    next: u64,
}

impl Page {
    /// Calls `method`; returns its result (events on the way are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let message = json!({ "id": id, "method": method, "params": params });
        self.socket
            .send(tungstenite::Message::text(message.to_string()))
            .expect("send to DevTools");
        loop {
            let message = self.socket.read().expect("read from DevTools");
            let tungstenite::Message::Text(text) = message else {
                continue;
            };
            let value: Value = serde_json::from_str(text.as_str()).expect("DevTools JSON");
            if value["id"] == id {
                assert!(value["error"].is_null(), "{method}: {value}");
                return value["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        assert!(
            result["exceptionDetails"].is_null(),
            "{expression}: {result}"
        );
        result["result"]["value"].clone()
    }

    /// Waits (bounded) until `expression` is true in the page.
    fn wait_until(&mut self, what: &str, expression: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.eval(expression) != Value::Bool(true) {
            assert!(
                Instant::now() < deadline,
                "the page did not show {what}; its text:\n{}",
                self.eval("document.body.innerText")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn the_dashboard_shows_the_herd_and_its_changes_live_in_chromium() {
    let Some(program) = chromium() else {
        eprintln!(
            "skipping the dashboard test: chromium is not installed \
             (scripts/test installs Debian's chromium package)"
        );
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("job.sh");
    // A little work per job, so that the chart has a shape.
    std::fs::write(&script, "read job\nsleep 0.02\necho \"did $job\"\n").expect("script");
    let mut herd = Herd::new(&format!(
        r#"
[http]
bind = "127.0.0.1:0"
token = "{TOKEN}"

[[group]]
name = "web"
command = "sleep"
args = ["300"]
stop_grace = "2s"
[group.local]
instances = 3

[[group]]
name = "images"
command = "sh"
args = [{script:?}]
stop_grace = "2s"
[group.feeder]
file = "{queue}"
[group.consumer]
run = "exec"
[group.queue]
progress_every = "200ms"
[group.local]
instances = 2
concurrency = 2
"#,
        script = script.display().to_string(),
        queue = dir.path().join("images.queue").display(),
    ));
    herd.start();
    let address = address_in(&herd.wait_for("http: listening on"));
    let browser = Browser::start(&program);
    let mut page = browser.page();
    page.call("Page.enable", json!({}));
    page.call(
        "Page.navigate",
        json!({ "url": format!("http://{address}/") }),
    );

    // The groups and their instances, from the event stream.
    page.wait_until(
        "both groups",
        r#"document.querySelector('.group[data-group="web"]') !== null
           && document.querySelector('.group[data-group="images"]') !== null"#,
    );
    page.wait_until(
        "three web instances running",
        r#"document.querySelectorAll('.group[data-group="web"] .instance[data-state="running"]').length === 3"#,
    );
    assert_eq!(
        page.eval("document.getElementById('live').textContent"),
        "live"
    );
    assert_eq!(
        page.eval(r#"document.querySelector('.host[data-host="localhost"]').dataset.up"#),
        "true"
    );
    // No token yet: no buttons.
    assert_eq!(
        page.eval("document.querySelectorAll('button[data-action]').length"),
        0
    );

    // A change made elsewhere (over HTTP, not by the page) arrives live.
    let suspended = post(address, "/v1/groups/web/suspend", Some(TOKEN), "");
    assert_eq!(suspended.status, 200, "{}", suspended.text());
    page.wait_until(
        "web suspended",
        r#"document.querySelector('.group[data-group="web"]').dataset.suspended === "true"
           && document.querySelectorAll('.group[data-group="web"] .instance[data-state="suspended"]').length === 3"#,
    );

    // With the token typed in, the buttons come; resume with one.
    page.eval(&format!(
        r#"(() => {{ const t = document.getElementById('token'); t.value = "{TOKEN}";
                    t.dispatchEvent(new Event('change')); return true; }})()"#
    ));
    page.wait_until(
        "the resume button",
        r#"document.querySelector('.group[data-group="web"] button[data-action="resume"]') !== null"#,
    );
    page.eval(r#"document.querySelector('.group[data-group="web"] button[data-action="resume"]').click()"#);
    page.wait_until(
        "web running again",
        r#"document.querySelector('.group[data-group="web"]').dataset.suspended === "false"
           && document.querySelectorAll('.group[data-group="web"] .instance[data-state="running"]').length === 3"#,
    );

    // Jobs flowing, a batch at a time: counts and the chart follow.
    const BATCH: usize = 40;
    for batch in 0..10 {
        let jobs: Vec<String> = (0..BATCH)
            .map(|n| format!("{{\"image\": {}}}", batch * BATCH + n))
            .collect();
        let added = post(
            address,
            "/v1/queues/images/jobs",
            Some(TOKEN),
            &format!("[{}]", jobs.join(",")),
        );
        assert_eq!(added.status, 202, "{}", added.text());
        page.wait_until(
            &format!("{} jobs done", (batch + 1) * BATCH),
            &format!(
                r#"document.querySelector('.group[data-group="images"] [data-count="done"] b').textContent === "{}""#,
                (batch + 1) * BATCH
            ),
        );
    }
    page.wait_until("a few samples in the chart", "samples.length >= 4");

    let shot = page.call("Page.captureScreenshot", json!({ "format": "png" }));
    let png = data_encoding::BASE64
        .decode(shot["data"].as_str().expect("screenshot").as_bytes())
        .expect("base64");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let path = std::env::var_os("TASKHERD_SCREENSHOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png"));
    std::fs::write(&path, png).expect("write the screenshot");
    eprintln!("dashboard screenshot: {}", path.display());

    drop(page);
    drop(browser);
    herd.signal(libc::SIGTERM);
    assert!(herd.wait_exit().success(), "{}", herd.seen.join("\n"));
    herd.assert_no_leftovers();
}
