//! keygate-echo: the sample upstream ("coordinator") behind Envoy in `make run` and the
//! tests. Every request gets 200 and a JSON echo of what arrived, so a user sees exactly
//! what keygate forwarded: `{"method", "path", "headers", "body_bytes"}`.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{json, Map, Value};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage: keygate-echo [--listen ADDR:PORT]   (default 127.0.0.1:8080)";
const MAX_HEAD: usize = 64 * 1024;

fn main() -> ExitCode {
    let mut listen = "127.0.0.1:8080".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--listen", Some(addr)) => listen = addr,
            ("--help" | "-h", _) => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => {
                eprintln!("keygate-echo: bad arguments\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let listener = match TcpListener::bind(&listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("keygate-echo: cannot listen on {listen}: {e}");
            return ExitCode::from(1);
        }
    };
    let addr = listener.local_addr().map_or(listen, |a| a.to_string());
    println!("keygate-echo listening on {addr}");
    let _ = io::stdout().flush();
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            // Any I/O or protocol error just closes the connection.
            let _ = serve(stream);
        });
    }
    ExitCode::SUCCESS
}

/// Serves requests on one connection until the client closes it or asks to.
fn serve(stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let Some(head) = read_head(&mut reader)? else {
            return Ok(());
        };
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default();
        let mut parts = request_line.split(' ');
        let (method, path, version) = match (parts.next(), parts.next(), parts.next()) {
            (Some(m), Some(p), Some(v)) => (m.to_string(), p.to_string(), v.to_string()),
            _ => return respond_error(&mut writer, "400 Bad Request"),
        };
        let mut headers: Vec<(String, String)> = Vec::new();
        for line in lines.filter(|l| !l.is_empty()) {
            let Some((name, value)) = line.split_once(':') else {
                return respond_error(&mut writer, "400 Bad Request");
            };
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.to_ascii_lowercase())
        };
        let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let body_bytes = if chunked {
            read_chunked(&mut reader)?
        } else {
            let len = match header("content-length").map(|v| v.parse::<u64>()) {
                None => 0,
                Some(Ok(n)) => n,
                Some(Err(_)) => return respond_error(&mut writer, "400 Bad Request"),
            };
            io::copy(&mut (&mut reader).take(len), &mut io::sink())?
        };
        let keep_alive = match header("connection") {
            Some(c) if c.contains("close") => false,
            Some(c) if c.contains("keep-alive") => true,
            _ => version == "HTTP/1.1",
        };

        let mut echoed = Map::new();
        for (name, value) in &headers {
            match echoed.get_mut(name) {
                Some(Value::String(existing)) => {
                    existing.push_str(", ");
                    existing.push_str(value);
                }
                _ => {
                    echoed.insert(name.clone(), Value::String(value.clone()));
                }
            }
        }
        let body = format!(
            "{}\n",
            json!({"method": method, "path": path, "headers": echoed, "body_bytes": body_bytes})
        );
        let connection = if keep_alive { "keep-alive" } else { "close" };
        write!(
            writer,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: {connection}\r\n\r\n",
            body.len()
        )?;
        if method != "HEAD" {
            writer.write_all(body.as_bytes())?;
        }
        writer.flush()?;
        if !keep_alive {
            return Ok(());
        }
    }
}

/// Reads the request line and headers; `None` when the client closed between requests.
fn read_head(reader: &mut BufReader<TcpStream>) -> io::Result<Option<String>> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = reader
            .by_ref()
            .take(MAX_HEAD as u64)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        if head.is_empty() && (line == b"\r\n" || line == b"\n") {
            continue; // stray CRLF between requests
        }
        head.extend_from_slice(&line);
        if head.len() > MAX_HEAD {
            return Err(io::ErrorKind::InvalidData.into());
        }
        if line == b"\r\n" || line == b"\n" {
            return Ok(Some(
                String::from_utf8_lossy(&head)
                    .replace("\r\n", "\n")
                    .replace('\n', "\r\n"),
            ));
        }
    }
}

/// Reads and discards a chunked body, trailers included; returns its length.
fn read_chunked(reader: &mut BufReader<TcpStream>) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let mut line = String::new();
        reader.by_ref().take(4096).read_line(&mut line)?;
        let size_text = line.trim().split(';').next().unwrap_or_default();
        let size = u64::from_str_radix(size_text, 16)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                let mut trailer = String::new();
                if reader
                    .by_ref()
                    .take(MAX_HEAD as u64)
                    .read_line(&mut trailer)?
                    == 0
                    || trailer.trim().is_empty()
                {
                    return Ok(total);
                }
            }
        }
        total += io::copy(&mut reader.by_ref().take(size), &mut io::sink())?;
        let mut crlf = String::new();
        reader.by_ref().take(2).read_line(&mut crlf)?;
    }
}

fn respond_error(writer: &mut TcpStream, status: &str) -> io::Result<()> {
    write!(
        writer,
        "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )?;
    writer.flush()
}
