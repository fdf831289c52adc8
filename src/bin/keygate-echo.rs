//! keygate-echo: the sample upstream ("coordinator") behind Envoy in `make run` and the
//! tests. Every request gets 200 and a JSON echo of what arrived, so a user sees exactly
//! what keygate forwarded: `{"method", "path", "headers", "body_bytes"}`.
//! Standard library plus serde_json only; any I/O or protocol error closes the connection.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{json, Map, Value};
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str =
    "usage: keygate-echo [--listen ADDR:PORT]  (default 127.0.0.1:8080; IPv6 as [::1]:8080)";
/// Cap on request line + headers (and, separately, on chunked trailers).
const MAX_HEAD: usize = 64 * 1024;
/// A connection idle (or stalled mid-request) this long is dropped, so dead peers don't
/// pin threads forever.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    let mut listen = String::from("127.0.0.1:8080");
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("-h" | "--help") => {
                let _ = writeln!(io::stdout(), "{USAGE}");
                return ExitCode::SUCCESS;
            }
            Some("--listen") => match args.next().and_then(|a| a.into_string().ok()) {
                Some(addr) => listen = addr,
                None => return usage_error("--listen needs ADDR:PORT"),
            },
            _ => return usage_error(&format!("unexpected argument {arg:?}")),
        }
    }
    let addrs: Vec<SocketAddr> = match listen.to_socket_addrs() {
        Ok(addrs) => addrs.collect(),
        Err(e) => return usage_error(&format!("bad --listen address {listen:?}: {e}")),
    };
    let listener = match TcpListener::bind(&addrs[..]) {
        Ok(l) => l,
        Err(e) => {
            let _ = writeln!(io::stderr(), "keygate-echo: cannot listen on {listen}: {e}");
            return ExitCode::from(1);
        }
    };
    let addr = listener.local_addr().map_or(listen, |a| a.to_string());
    // Tests wait for this exact line; print! would panic on a closed stdout.
    let mut stdout = io::stdout().lock();
    let _ = writeln!(stdout, "keygate-echo listening on {addr}").and_then(|()| stdout.flush());
    drop(stdout);
    for conn in listener.incoming() {
        match conn {
            // Builder::spawn reports failure where thread::spawn would panic; on failure the
            // stream is dropped, which closes the connection.
            Ok(stream) => {
                let _ = std::thread::Builder::new().spawn(move || serve(stream));
            }
            // E.g. out of file descriptors: back off rather than spin.
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    ExitCode::SUCCESS
}

fn usage_error(message: &str) -> ExitCode {
    let _ = writeln!(io::stderr(), "keygate-echo: {message} (see --help)");
    ExitCode::from(2)
}

/// Serves requests on one connection (Envoy pools and reuses upstream connections)
/// until the client closes it or asks to.
fn serve(stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    // Each response is one write; no reason to let Nagle hold it back.
    stream.set_nodelay(true)?;
    let mut out = stream.try_clone()?;
    let mut input = BufReader::new(stream);
    loop {
        let lines = match read_head(&mut input) {
            Ok(Some(lines)) => lines,
            Ok(None) => return Ok(()),
            // Over MAX_HEAD: say so, then close (the rest of the request is unread).
            Err(e) if e.kind() == ErrorKind::InvalidData => {
                return reply_error(&mut out, "431 Request Header Fields Too Large")
            }
            Err(e) => return Err(e),
        };
        let Some((method, path, http10, headers)) = parse_head(&lines) else {
            return reply_error(&mut out, "400 Bad Request");
        };
        let header = |name: &str| headers.get(name).and_then(Value::as_str).unwrap_or("");
        let tokens = |name: &str| {
            let value = header(name).to_ascii_lowercase();
            value
                .split(',')
                .map(|t| t.trim().to_string())
                .collect::<Vec<_>>()
        };

        // Framing (RFC 9112 §6): Transfer-Encoding wins over Content-Length, and in a
        // request chunked must be its last coding. Repeated headers arrive joined, so
        // conflicting Content-Lengths ("5, 7") fail to parse and get a 400.
        let chunked = headers.contains_key("transfer-encoding");
        let te_ok =
            !chunked || tokens("transfer-encoding").last().map(String::as_str) == Some("chunked");
        let length = if chunked || !headers.contains_key("content-length") {
            Some(0)
        } else {
            let v = header("content-length");
            // Digits only: u64's parser would also take "+5".
            v.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| v.parse::<u64>().ok())
                .flatten()
        };
        let (true, Some(length)) = (te_ok, length) else {
            return reply_error(&mut out, "400 Bad Request");
        };
        if !http10 && (chunked || length > 0) && tokens("expect").contains(&"100-continue".into()) {
            out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let body_bytes = if chunked {
            read_chunked(&mut input)?
        } else {
            let n = io::copy(&mut (&mut input).take(length), &mut io::sink())?;
            if n < length {
                return Err(ErrorKind::UnexpectedEof.into()); // client left mid-body
            }
            n
        };

        let connection = tokens("connection");
        let has = |t: &str| connection.iter().any(|c| c == t);
        // HTTP/1.1 is persistent unless "close"; HTTP/1.0 only with "keep-alive".
        let keep_alive = !has("close") && (!http10 || has("keep-alive"));
        let body = format!(
            "{}\n",
            json!({"method": method, "path": path, "headers": headers, "body_bytes": body_bytes})
        );
        let mut response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: {}\r\n\r\n",
            body.len(),
            if keep_alive { "keep-alive" } else { "close" }
        );
        if method != "HEAD" {
            response.push_str(&body);
        }
        out.write_all(response.as_bytes())?;
        if !keep_alive {
            return Ok(());
        }
    }
}

/// Request line and header lines (without CRLFs), or `None` when the client closed
/// cleanly between requests. InvalidData when the head exceeds MAX_HEAD.
fn read_head(input: &mut impl BufRead) -> io::Result<Option<Vec<String>>> {
    let mut budget = MAX_HEAD;
    let mut lines = Vec::new();
    loop {
        match read_line(input, &mut budget)? {
            None if lines.is_empty() => return Ok(None),
            None => return Err(ErrorKind::UnexpectedEof.into()),
            // RFC 9112 §2.2: ignore empty lines before a request line.
            Some(line) if line.is_empty() && lines.is_empty() => {}
            Some(line) if line.is_empty() => return Ok(Some(lines)),
            Some(line) => lines.push(String::from_utf8_lossy(&line).into_owned()),
        }
    }
}

/// (method, target, is HTTP/1.0, headers); header names lowercased, repeated
/// headers joined with ", " in arrival order. `None` if malformed.
fn parse_head(lines: &[String]) -> Option<(&str, &str, bool, Map<String, Value>)> {
    let (request_line, fields) = lines.split_first()?;
    let mut parts = request_line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || method.is_empty() || target.is_empty() {
        return None;
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return None,
    };
    let mut headers = Map::new();
    for line in fields {
        // No name, whitespace in the name or obsolete line folding: reject (RFC 9112 §5).
        let (name, value) = line.split_once(':')?;
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return None;
        }
        let (name, value) = (name.to_ascii_lowercase(), value.trim_matches([' ', '\t']));
        match headers.get_mut(&name) {
            Some(Value::String(joined)) => {
                joined.push_str(", ");
                joined.push_str(value);
            }
            _ => {
                headers.insert(name, value.into());
            }
        }
    }
    Some((method, target, http10, headers))
}

/// Reads and discards a chunked body, trailers included; returns the data's length.
fn read_chunked(input: &mut impl BufRead) -> io::Result<u64> {
    let bad = || io::Error::from(ErrorKind::InvalidData);
    let mut total = 0u64;
    loop {
        // chunk-size [; extensions] CRLF
        let line = read_line(input, &mut 4096)?.ok_or(ErrorKind::UnexpectedEof)?;
        let line = String::from_utf8_lossy(&line);
        let hex = line.split(';').next().unwrap_or_default().trim();
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let size = u64::from_str_radix(hex, 16).map_err(|_| bad())?;
        if size == 0 {
            break;
        }
        let n = io::copy(&mut input.by_ref().take(size), &mut io::sink())?;
        if n < size {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        total = total.saturating_add(n);
        if read_line(input, &mut 2)? != Some(Vec::new()) {
            return Err(bad()); // data must end with CRLF
        }
    }
    // Trailer fields up to an empty line, bounded like the head.
    let mut budget = MAX_HEAD;
    loop {
        match read_line(input, &mut budget)? {
            None => return Err(ErrorKind::UnexpectedEof.into()),
            Some(line) if line.is_empty() => return Ok(total),
            Some(_) => {}
        }
    }
}

/// One line without its CRLF (or bare LF), its bytes charged to `budget`. `None` at a
/// clean EOF; InvalidData if the line overruns the budget, so memory stays bounded.
fn read_line(input: &mut impl BufRead, budget: &mut usize) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let limit = u64::try_from(*budget).unwrap_or(u64::MAX).saturating_add(1);
    let n = input.by_ref().take(limit).read_until(b'\n', &mut line)?;
    *budget = budget.checked_sub(n).ok_or(ErrorKind::InvalidData)?;
    if n == 0 {
        return Ok(None);
    }
    if line.pop() != Some(b'\n') {
        return Err(ErrorKind::UnexpectedEof.into());
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(line))
}

fn reply_error(out: &mut TcpStream, status: &str) -> io::Result<()> {
    let response = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    out.write_all(response.as_bytes())
}
