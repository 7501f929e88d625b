//! A small blocking HTTP/1.1 client for the tests of the master's HTTP
//! interface: one request per connection (`Connection: close`), chunked
//! bodies decoded, and a reader of server-sent events.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Longest wait for one answer.
const ANSWER_WAIT: Duration = Duration::from_secs(30);

/// An answer.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {}", self.text()))
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The `error` of a JSON error answer.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error in {}", self.text()))
            .to_string()
    }
}

/// The address of the master's HTTP interface, from its log line
/// `http: listening on http://ADDR/`.
pub fn address_in(line: &str) -> SocketAddr {
    let at = line.find("http://").expect("an address in the line") + "http://".len();
    let text = line[at..].split('/').next().expect("address");
    text.parse().unwrap_or_else(|err| panic!("{text}: {err}"))
}

fn connect(address: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&address, ANSWER_WAIT).expect("connect");
    stream.set_read_timeout(Some(ANSWER_WAIT)).expect("timeout");
    stream
}

fn write_request(
    stream: &mut TcpStream,
    address: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str("\r\n");
    // One write: a server that answers before reading a body (413) has
    // it in its buffer already, and closes without a reset.
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    let _ = stream.write_all(&request);
}

/// Reads a status line and headers.
fn read_head(reader: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    reader.read_line(&mut line).expect("status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not a status line: {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).expect("header");
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((key, value)) = header.split_once(':') {
            headers.push((key.trim().to_string(), value.trim().to_string()));
        }
    }
    (status, headers)
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    headers.iter().any(|(key, value)| {
        key.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked")
    })
}

/// One chunk of a chunked body (`None` at its end).
fn read_chunk(reader: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let size = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
    let mut chunk = vec![0; size + 2];
    reader.read_exact(&mut chunk).ok()?;
    chunk.truncate(size);
    (size > 0).then_some(chunk)
}

/// Sends a request and reads the whole answer.
pub fn request(
    address: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> Response {
    let mut stream = connect(address);
    write_request(&mut stream, address, method, path, token, body);
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader);
    let mut body = Vec::new();
    if is_chunked(&headers) {
        while let Some(chunk) = read_chunk(&mut reader) {
            body.extend(chunk);
        }
    } else if let Some(length) = headers
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.parse::<usize>().ok())
    {
        body.resize(length, 0);
        reader.read_exact(&mut body).expect("body");
    } else {
        reader.read_to_end(&mut body).expect("body");
    }
    Response {
        status,
        headers,
        body,
    }
}

/// `GET path`.
pub fn get(address: SocketAddr, path: &str, token: Option<&str>) -> Response {
    request(address, "GET", path, token, b"")
}

/// `POST path` with `body`.
pub fn post(address: SocketAddr, path: &str, token: Option<&str>, body: &str) -> Response {
    request(address, "POST", path, token, body.as_bytes())
}

/// A server-sent event stream (`GET /v1/events`).
pub struct EventStream {
    reader: BufReader<TcpStream>,
    chunked: bool,
    pending: Vec<u8>,
}

impl EventStream {
    /// Opens the stream; panics unless the answer is 200.
    pub fn open(address: SocketAddr, token: Option<&str>) -> EventStream {
        let mut stream = connect(address);
        write_request(&mut stream, address, "GET", "/v1/events", token, b"");
        let mut reader = BufReader::new(stream);
        let (status, headers) = read_head(&mut reader);
        assert_eq!(status, 200, "{headers:?}");
        EventStream {
            chunked: is_chunked(&headers),
            reader,
            pending: Vec::new(),
        }
    }

    /// The next event (name, JSON data), waiting until `deadline`.
    pub fn next(&mut self, deadline: Instant) -> Option<(String, serde_json::Value)> {
        loop {
            if let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.pending.drain(..end + 2).collect();
                let block = String::from_utf8_lossy(&block).into_owned();
                let mut name = "message".to_string();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("event:") {
                        name = value.trim().to_string();
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push_str(value.strip_prefix(' ').unwrap_or(value));
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                let data = serde_json::from_str(&data).expect("JSON data");
                return Some((name, data));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let stream = self.reader.get_ref();
            stream.set_read_timeout(Some(left)).expect("timeout");
            if self.chunked {
                self.pending.extend(read_chunk(&mut self.reader)?);
            } else {
                let mut buf = [0; 8192];
                match self.reader.read(&mut buf) {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                }
            }
        }
    }

    /// Waits until an event for which `wanted` is true; panics at
    /// `deadline`, listing what came.
    pub fn wait_for(
        &mut self,
        deadline: Instant,
        what: &str,
        mut wanted: impl FnMut(&str, &serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut seen = Vec::new();
        while let Some((name, data)) = self.next(deadline) {
            if wanted(&name, &data) {
                return data;
            }
            seen.push(format!("{name}: {data}"));
        }
        panic!("no {what} event in time; seen:\n{}", seen.join("\n"));
    }
}
