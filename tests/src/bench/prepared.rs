//! The `prepared` client of `ledger-api`: payments signed before the timed window and sent
//! over one HTTP/1.1 connection per caller with hyper.
//!
//! The bench shares the machine's cores with the control plane it measures. Through the
//! SDK a payment costs the bench about half of what it costs the server: an Ed25519
//! signature, and reqwest's pool, redirect and timeout layers over hyper. Agents sign on
//! their own machines, so here, as `relay` does with its envelopes, each caller signs its
//! requests ahead of the timed window and sends them with hyper's own connection. The
//! server gets the bytes the SDK would send: the same path, headers, signed string and
//! JSON body, each with a fresh nonce, timestamp and transfer id.
//!
//! A caller prepares for [`PREPARED_CALLS_PER_SECOND`] calls per second shared by all
//! callers, [`PREPARED_CALLS_MAX`] in all; once its requests run out, or are older than
//! [`PREPARED_AGE_MAX`], it signs each one just before sending it, and the run counts
//! those.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use molt_protocol::UnixMillis;
use molt_protocol::request::{NONCE_BYTES, sign_request};
use molt_sdk::api::{AgentCredentials, Credits, LedgerTransfer, Problem, TransferKey, is_problem_document};
use rand::RngCore as _;
use tokio::net::TcpStream;

/// Calls per second, over all callers, that the prepared requests are meant to last for.
pub const PREPARED_CALLS_PER_SECOND: u64 = 20_000;
/// Requests prepared in all, at most (about 1 KiB each).
pub const PREPARED_CALLS_MAX: u64 = 150_000;
/// A prepared request older than this is signed afresh: its timestamp must stay well inside
/// the server's window (5 minutes either way).
pub const PREPARED_AGE_MAX: Duration = Duration::from_secs(60);
/// Largest answer read; a payment's is a few hundred bytes.
const RESPONSE_BYTES_MAX: usize = 64 * 1024;
/// The single-transfer call.
const PAY_PATH: &str = "/v1/ledger/transfers";

/// Requests one of `clients` callers prepares for a phase of `seconds`.
pub fn prepared_per_caller(seconds: u64, clients: usize) -> usize {
    let clients = clients.max(1) as u64;
    let wanted = (seconds * PREPARED_CALLS_PER_SECOND).div_ceil(clients);
    wanted.min(PREPARED_CALLS_MAX / clients) as usize
}

/// A signed payment request, ready to send.
#[derive(Debug)]
pub struct Prepared {
    pub payee: usize,
    pub amount: u64,
    pub key: TransferKey,
    request: Request<Full<Bytes>>,
}

/// Signs a payment of `amount` micro-credits (0 for a call the server must refuse) from
/// `agents[payer]` to `agents[payee]`, with a fresh transfer id, nonce and timestamp.
pub fn prepare(agents: &[AgentCredentials], payer: usize, payee: usize, amount: u64, host: &HeaderValue) -> Prepared {
    let key = TransferKey::random();
    // Invariant: callers pay small amounts, far below Credits::MAX.
    let credits = Credits::from_micros(amount).expect("a small amount is valid");
    // The SDK's body for a payment that is not linked.
    let body = serde_json::json!({ "id": key, "to": agents[payee].agent_id.to_string(), "amount": credits });
    // Invariant: a JSON value serialises.
    let body = serde_json::to_vec(&body).expect("a JSON value serialises");
    let mut nonce = [0u8; NONCE_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let agent = &agents[payer];
    let now = UnixMillis::now_from_system();
    let headers = sign_request(&agent.signing_key, agent.agent_id, "POST", PAY_PATH, now, nonce, &body);
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(PAY_PATH)
        .header(HOST, host.clone())
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (name, value) in headers {
        request = request.header(name, value);
    }
    // Invariant: the names are constants and the values hex or decimal.
    let request = request.body(Full::new(Bytes::from(body))).expect("a well-formed request");
    Prepared { payee, amount, key, request }
}

/// What the server answered to one request.
#[derive(Debug)]
pub enum Answer {
    Applied(Box<LedgerTransfer>),
    Refused(Problem),
}

/// Why a request got no usable answer: a short stable kind and a message.
pub type Failure = (String, String);

/// One caller's HTTP/1.1 connection to the control plane, opened again if the server
/// closes it.
pub struct Connection {
    address: SocketAddr,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Connection {
    pub fn new(address: SocketAddr) -> Connection {
        Connection { address, sender: None }
    }

    /// The `Host` header for this server.
    pub fn host(&self) -> HeaderValue {
        // Invariant: a socket address is valid header text.
        HeaderValue::from_str(&self.address.to_string()).expect("an address is a valid header value")
    }

    /// Sends `request` and reads the answer.
    pub async fn send(&mut self, request: Prepared) -> Result<Answer, Failure> {
        let sender = match &mut self.sender {
            Some(sender) if !sender.is_closed() => sender,
            _ => self.sender.insert(open(self.address).await?),
        };
        if let Err(error) = sender.ready().await {
            self.sender = None;
            return Err(transport(&error));
        }
        let response = match sender.send_request(request.request).await {
            Ok(response) => response,
            Err(error) => {
                self.sender = None;
                return Err(transport(&error));
            }
        };
        let status = response.status();
        let is_problem = is_problem_document(response.headers());
        let body = Limited::new(response.into_body(), RESPONSE_BYTES_MAX).collect().await;
        let body = body.map_err(|error| ("transport: reading the answer".to_owned(), error.to_string()))?.to_bytes();
        judge(status, is_problem, &body)
    }
}

async fn open(address: SocketAddr) -> Result<SendRequest<Full<Bytes>>, Failure> {
    let connecting = |error: &dyn std::fmt::Display| ("transport: connecting".to_owned(), error.to_string());
    let stream = TcpStream::connect(address).await.map_err(|error| connecting(&error))?;
    stream.set_nodelay(true).map_err(|error| connecting(&error))?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.map_err(|error| connecting(&error))?;
    // Drives the connection; ends when the sender is dropped or the server closes it.
    tokio::spawn(connection);
    Ok(sender)
}

fn transport(error: &hyper::Error) -> Failure {
    ("transport: other".to_owned(), error.to_string())
}

/// The answer a status, content type and body make, as the SDK reads them.
fn judge(status: StatusCode, is_problem: bool, body: &[u8]) -> Result<Answer, Failure> {
    if status.is_success() {
        return match serde_json::from_slice::<LedgerTransfer>(body) {
            Ok(transfer) => Ok(Answer::Applied(Box::new(transfer))),
            Err(error) => Err(("undecodable answer".to_owned(), error.to_string())),
        };
    }
    if is_problem {
        if let Ok(problem) = serde_json::from_slice::<Problem>(body) {
            return Ok(Answer::Refused(problem));
        }
    }
    let excerpt: String = String::from_utf8_lossy(body).chars().take(200).collect();
    Err((format!("HTTP {} without a problem document", status.as_u16()), excerpt))
}

/// The requests one caller prepared, used oldest first while they are fresh.
pub struct Queue {
    requests: VecDeque<Prepared>,
    prepared_at: Instant,
}

impl Queue {
    pub fn new(requests: Vec<Prepared>) -> Queue {
        Queue { requests: requests.into(), prepared_at: Instant::now() }
    }

    /// The next prepared request, if one is left and still fresh.
    pub fn next(&mut self) -> Option<Prepared> {
        if self.prepared_at.elapsed() > PREPARED_AGE_MAX {
            self.requests.clear();
        }
        self.requests.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use molt_protocol::keys::SigningKey;
    use molt_protocol::request::canonical_request;

    use super::*;

    #[test]
    fn callers_prepare_for_the_rate_within_the_bound() {
        assert_eq!(prepared_per_caller(5, 32), 3_125);
        assert_eq!(prepared_per_caller(5, 3), 33_334);
        // 600 s at the rate would be 12 million requests: the bound holds.
        assert_eq!(prepared_per_caller(600, 32), (PREPARED_CALLS_MAX / 32) as usize);
        assert!(prepared_per_caller(600, 1) as u64 <= PREPARED_CALLS_MAX);
    }

    #[tokio::test]
    async fn a_prepared_payment_is_signed_over_its_own_body() {
        let agents: Vec<AgentCredentials> = (0..2)
            .map(|_| AgentCredentials::from_inception_key(SigningKey::generate(&mut rand::rngs::OsRng)))
            .collect();
        let host = HeaderValue::from_static("127.0.0.1:8080");
        let prepared = prepare(&agents, 0, 1, 250, &host);
        let headers = prepared.request.headers();
        let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok()).unwrap().to_owned();
        assert_eq!(header("molt-agent"), agents[0].agent_id.to_string());
        assert_eq!(header("host"), "127.0.0.1:8080");
        let bytes = prepared.request.body().clone().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["to"], agents[1].agent_id.to_string());
        assert_eq!(body["id"], prepared.key.as_str());
        let timestamp = UnixMillis(header("molt-timestamp").parse().unwrap());
        let signed = canonical_request("POST", PAY_PATH, timestamp, &header("molt-nonce"), &bytes);
        let signature = hex::decode(header("molt-signature")).unwrap();
        let signature = molt_protocol::keys::Signature(signature.try_into().unwrap());
        assert!(agents[0].signing_key.public_key().verify(signed.as_bytes(), &signature).is_ok());
        // Another prepared request has its own nonce and transfer id.
        let other = prepare(&agents, 0, 1, 250, &host);
        assert_ne!(other.request.headers()["molt-nonce"], headers["molt-nonce"]);
        assert_ne!(other.key, prepared.key);
    }

    #[test]
    fn answers_are_read_as_the_sdk_reads_them() {
        let problem = br#"{"type":"urn:molt:problem:invalid_amount","title":"Unprocessable Entity","status":422,"detail":"zero","code":"invalid_amount"}"#;
        match judge(StatusCode::UNPROCESSABLE_ENTITY, true, problem) {
            Ok(Answer::Refused(problem)) => assert_eq!(problem.code, "invalid_amount"),
            other => panic!("{other:?}"),
        }
        let (kind, excerpt) = judge(StatusCode::BAD_GATEWAY, false, b"upstream down").unwrap_err();
        assert_eq!((kind.as_str(), excerpt.as_str()), ("HTTP 502 without a problem document", "upstream down"));
        let (kind, _) = judge(StatusCode::OK, false, b"{not json").unwrap_err();
        assert_eq!(kind, "undecodable answer");
        let (kind, _) = judge(StatusCode::UNPROCESSABLE_ENTITY, true, b"<html>").unwrap_err();
        assert_eq!(kind, "HTTP 422 without a problem document");
    }

    #[test]
    fn stale_requests_are_not_sent() {
        let agents = vec![AgentCredentials::from_inception_key(SigningKey::generate(&mut rand::rngs::OsRng)); 2];
        // (One agent paying itself is refused by the server, not here.)
        let host = HeaderValue::from_static("127.0.0.1:8080");
        let mut queue = Queue::new(vec![prepare(&agents, 0, 1, 1, &host), prepare(&agents, 0, 1, 2, &host)]);
        assert_eq!(queue.next().map(|prepared| prepared.amount), Some(1));
        queue.prepared_at -= PREPARED_AGE_MAX + Duration::from_secs(1);
        assert!(queue.next().is_none());
    }
}
