//! One relay connection: the consumer's WebSocket on one side, Kraken's on
//! the other, one task between them (and one writing to the consumer, so a
//! consumer that does not read never stalls what comes from Kraken).

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as KrakenMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as KrakenCloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tracing::{debug, info};

mod revoke;

use super::audit::{Who, order_line};
use super::injected::Injected;
use super::metrics::Direction;
use super::upstream::KrakenSocket;
use super::{CONSUMER_QUEUE, Refusal, close_reason};
use crate::audit::Event;
use crate::http::{AppState, Consumer, Held, ServeTable};
use crate::kraken::ws::{Answer, CHANNELS, METHODS, Malformed, Request, error_answer};
use crate::secret::SecretString;
use crate::token::{AccountHandle, CachedToken};

/// Requests awaiting Kraken's answer that a connection keeps (to resend
/// one with a new token, to audit an order with its answer); past this the
/// oldest is given up (audited as unanswered).
const MAX_PENDING: usize = 256;
/// A request unanswered this long is given up.
const PENDING_FOR: Duration = Duration::from_secs(60);
/// How long the closing handshakes may take at the end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What a session starts from.
pub(super) struct Start {
    pub state: AppState,
    pub table: Arc<ServeTable>,
    pub consumer: Arc<Consumer>,
    pub account: String,
    pub handle: AccountHandle,
    pub peer: Option<SocketAddr>,
    pub reprove_at: Option<Instant>,
    /// A ServiceAccount consumer's `Authorization` value, to prove it again.
    pub bearer: Option<SecretString>,
    pub permit: OwnedSemaphorePermit,
}

/// A request sent to Kraken and not yet answered.
struct Pending {
    request: Request,
    /// When it was sent (to give it up after [`PENDING_FOR`]).
    sent: Instant,
    /// The token it carries (to report it if Kraken refuses it).
    token: Option<[u8; 32]>,
    resent: bool,
}

/// How a session ends.
enum End {
    /// Close the consumer with this code and reason.
    Close(u16, String),
    /// The consumer closed or went away.
    ConsumerGone,
    /// The consumer does not read: its queue is full.
    SlowReader,
}

pub(super) struct Session {
    state: AppState,
    table: Arc<ServeTable>,
    consumer: Arc<Consumer>,
    account: String,
    handle: AccountHandle,
    peer: Option<SocketAddr>,
    reprove_at: Option<Instant>,
    bearer: Option<SecretString>,
    /// The methods (and channels) sent on this connection: a reload that
    /// takes one away ends it.
    used: BTreeSet<(String, Option<String>)>,
    pending: VecDeque<Pending>,
    injected: Injected,
    to_consumer: Option<mpsc::Sender<Message>>,
    _permit: OwnedSemaphorePermit,
    /// `relay_connections{account}`, held up while the session lives.
    _open: Held,
}

fn peer_text(peer: Option<SocketAddr>) -> String {
    peer.map_or_else(|| "-".to_owned(), |p| p.to_string())
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

impl Session {
    pub(super) fn new(start: Start) -> Self {
        let open = Held::enter(start.state.metrics.relay().connections(&start.account));
        Self {
            state: start.state,
            table: start.table,
            consumer: start.consumer,
            account: start.account,
            handle: start.handle,
            peer: start.peer,
            reprove_at: start.reprove_at,
            bearer: start.bearer,
            used: BTreeSet::new(),
            pending: VecDeque::new(),
            injected: Injected::default(),
            to_consumer: None,
            _permit: start.permit,
            _open: open,
        }
    }

    /// Relays until either side ends, a reload revokes it, or the broker
    /// stops; then closes both sides.
    pub(super) async fn run(mut self, socket: WebSocket, kraken: KrakenSocket) {
        let (sink, from_consumer) = socket.split();
        let (tx, rx) = mpsc::channel(CONSUMER_QUEUE);
        self.to_consumer = Some(tx);
        let mut writer = tokio::spawn(write_to_consumer(sink, rx));
        let (mut to_kraken, from_kraken) = kraken.split();
        info!(consumer = %self.consumer.name, account = %self.account, peer = %peer_text(self.peer), "relay opened");
        let (end, kraken_closed) = self.relay(from_consumer, &mut to_kraken, from_kraken).await;
        let reason = match &end {
            End::Close(code, reason) => format!("{code} {reason}"),
            End::ConsumerGone => "the consumer closed".to_owned(),
            End::SlowReader => "the consumer did not read".to_owned(),
        };
        info!(consumer = %self.consumer.name, account = %self.account, peer = %peer_text(self.peer), why = %reason, "relay closed");
        // Kraken's side first, so the session ends at Kraken whatever the
        // consumer does.
        if !kraken_closed {
            let close = KrakenMessage::Close(Some(KrakenCloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }));
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                let _ = to_kraken.send(close).await;
                let _ = to_kraken.close().await;
            })
            .await;
        }
        let tx = self.to_consumer.take();
        match end {
            End::Close(code, reason) => {
                if let Some(tx) = &tx {
                    let frame = CloseFrame {
                        code,
                        reason: close_reason(&reason).into(),
                    };
                    if tx.try_send(Message::Close(Some(frame))).is_err() {
                        writer.abort();
                    }
                }
            }
            End::SlowReader => {
                self.state
                    .metrics
                    .relay()
                    .refused(&self.consumer.name, Refusal::SlowReader);
                writer.abort();
            }
            End::ConsumerGone => {}
        }
        drop(tx);
        if tokio::time::timeout(CLOSE_TIMEOUT, &mut writer).await.is_err() {
            writer.abort();
        }
        self.give_up_pending();
    }

    /// The relay loop; how it ended, and whether Kraken closed.
    async fn relay(
        &mut self,
        mut from_consumer: SplitStream<WebSocket>,
        to_kraken: &mut SplitSink<KrakenSocket, KrakenMessage>,
        mut from_kraken: SplitStream<KrakenSocket>,
    ) -> (End, bool) {
        let stop = self.state.streams.relays_stop.clone();
        let mut tables = self.state.streams.tables.subscribe();
        tables.mark_unchanged();
        // A reload that landed while the relay was being opened (Kraken's
        // connect, the upgrade) is followed now: subscribed first, so none
        // is missed in between.
        if !Arc::ptr_eq(&self.state.table.load_full(), &self.table)
            && let Err(end) = self.follow_reload()
        {
            return (end, false);
        }
        loop {
            let reprove = async {
                match self.reprove_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let step = tokio::select! {
                biased;
                _ = stop.cancelled() => Err(End::Close(1001, "the broker is shutting down".into())),
                changed = tables.changed() => match changed {
                    Err(_) => Err(End::Close(1001, "the broker is shutting down".into())),
                    Ok(()) => self.follow_reload(),
                },
                () = reprove => self.prove_again().await,
                message = from_kraken.next() => match message {
                    None => Err(End::Close(1011, "the connection to Kraken ended".into())),
                    Some(Err(error)) => {
                        debug!(%error, "relay: Kraken's side failed");
                        Err(End::Close(1011, "the connection to Kraken failed".into()))
                    }
                    Some(Ok(KrakenMessage::Close(frame))) => {
                        let (code, reason) = frame.map_or((1000, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
                        // Codes a close frame may not carry become "going away".
                        let code = if matches!(code, 1005 | 1006 | 1015) { 1001 } else { code };
                        return (End::Close(code, reason), true);
                    }
                    Some(Ok(KrakenMessage::Text(text))) => self.on_kraken_frame(text.as_str(), to_kraken).await,
                    Some(Ok(KrakenMessage::Binary(bytes))) => match std::str::from_utf8(&bytes) {
                        Ok(text) => self.on_kraken_frame(text, to_kraken).await,
                        Err(_) => Ok(()),
                    },
                    Some(Ok(_)) => Ok(()),
                },
                frame = from_consumer.next() => match frame {
                    None | Some(Ok(Message::Close(_))) => Err(End::ConsumerGone),
                    Some(Err(error)) => Err(self.consumer_error(error)),
                    Some(Ok(Message::Text(text))) => self.on_consumer_frame(text.as_str(), to_kraken).await,
                    Some(Ok(Message::Binary(bytes))) => match std::str::from_utf8(&bytes) {
                        Ok(text) => self.on_consumer_frame(text, to_kraken).await,
                        Err(_) => self.refuse_malformed(),
                    },
                    Some(Ok(_)) => Ok(()),
                },
            };
            if let Err(end) = step {
                return (end, false);
            }
        }
    }

    /// A read error from the consumer: a frame too large closes with 1009.
    fn consumer_error(&self, error: axum::Error) -> End {
        let inner = error.into_inner();
        let too_large = inner
            .downcast_ref::<tokio_tungstenite::tungstenite::Error>()
            .is_some_and(|e| matches!(e, tokio_tungstenite::tungstenite::Error::Capacity(_)));
        if too_large {
            self.state
                .metrics
                .relay()
                .refused(&self.consumer.name, Refusal::TooLarge);
            return End::Close(1009, format!("a frame over {} bytes", super::MAX_CONSUMER_FRAME));
        }
        End::ConsumerGone
    }

    /// Queues a frame for the consumer.
    fn send_to_consumer(&self, message: Message) -> Result<(), End> {
        let Some(tx) = &self.to_consumer else {
            return Err(End::ConsumerGone);
        };
        match tx.try_send(message) {
            Ok(()) => {
                self.state.metrics.relay().message(Direction::ToConsumer);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(End::SlowReader),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(End::ConsumerGone),
        }
    }

    /// The broker's own answer to a request, in Kraken's error shape.
    fn answer(&self, request: Option<&Request>, error: &str, time_in: &str) -> Result<(), End> {
        let text = error_answer(
            request.map(|r| r.method.as_str()),
            request.and_then(Request::req_id),
            error,
            time_in,
            &now_rfc3339(),
        );
        self.send_to_consumer(Message::Text(text.into()))
    }

    fn refuse_malformed(&self) -> Result<(), End> {
        self.state
            .metrics
            .relay()
            .refused(&self.consumer.name, Refusal::Malformed);
        self.answer(None, "EGeneral:Invalid arguments", &now_rfc3339())
    }

    /// A frame from the consumer: refused, or sent to Kraken with the token.
    async fn on_consumer_frame(
        &mut self,
        text: &str,
        to_kraken: &mut SplitSink<KrakenSocket, KrakenMessage>,
    ) -> Result<(), End> {
        let time_in = now_rfc3339();
        let request = match Request::parse(text) {
            Ok(request) => request,
            Err(Malformed::NotJson | Malformed::NoMethod) => return self.refuse_malformed(),
        };
        if !self.consumer.relay.allows(&request.method, request.channel.as_deref()) {
            self.state
                .metrics
                .relay()
                .refused(&self.consumer.name, Refusal::NotAllowed);
            let what = match &request.channel {
                Some(channel) => format!("{}:{channel}", request.method),
                None => request.method.clone(),
            };
            let error = format!(
                "EGeneral:Permission denied: the broker does not let consumer `{}` send `{what}` (relay.allow)",
                self.consumer.name
            );
            self.audit(&request, "refused", None, Some(&error));
            return self.answer(Some(&request), &error, &time_in);
        }
        // Only Kraken's own names are remembered (what a reload can take
        // away): a client's made-up names cannot grow the set.
        if METHODS.contains(&request.method.as_str())
            && request.channel.as_deref().is_none_or(|c| CHANNELS.contains(&c))
        {
            self.used.insert((request.method.clone(), request.channel.clone()));
        }
        let (text, token) = if request.needs_token() {
            let Some(token) = self.token().await else {
                self.state
                    .metrics
                    .relay()
                    .refused(&self.consumer.name, Refusal::NoToken);
                let error = format!(
                    "EService:Unavailable: the broker holds no token for account `{}` now",
                    self.account
                );
                self.audit(&request, "refused", None, Some(&error));
                return self.answer(Some(&request), &error, &time_in);
            };
            (request.with_token(token.token.expose()), Some(token.sha256))
        } else {
            // Always the body as read (one value per key, no token): what was
            // checked is what Kraken gets.
            (request.without_token(), None)
        };
        self.send_to_kraken(to_kraken, text).await?;
        if token.is_some() || request.is_trading() {
            self.remember(Pending {
                request,
                sent: Instant::now(),
                token,
                resent: false,
            });
        }
        Ok(())
    }

    async fn send_to_kraken(
        &self,
        to_kraken: &mut SplitSink<KrakenSocket, KrakenMessage>,
        text: String,
    ) -> Result<(), End> {
        if to_kraken.send(KrakenMessage::Text(text.into())).await.is_err() {
            return Err(End::Close(1011, "the connection to Kraken failed".into()));
        }
        self.state.metrics.relay().message(Direction::ToKraken);
        Ok(())
    }

    /// The account's token to inject: the held one if servable, else the
    /// one a refresh brings (bounded by the refresher's answer deadline).
    async fn token(&mut self) -> Option<Arc<CachedToken>> {
        let held = self
            .handle
            .published()
            .servable(Duration::ZERO, Instant::now())
            .cloned();
        let token = match held {
            Some(token) => token,
            None => self.handle.want_as(&self.consumer.name, Duration::ZERO).await.ok()?,
        };
        self.injected.note(&token);
        Some(token)
    }

    fn remember(&mut self, pending: Pending) {
        let now = Instant::now();
        while let Some(first) = self.pending.front() {
            if self.pending.len() < MAX_PENDING && now.duration_since(first.sent) < PENDING_FOR {
                break;
            }
            if let Some(given_up) = self.pending.pop_front() {
                self.audit(&given_up.request, "unanswered", None, None);
            }
        }
        self.pending.push_back(pending);
    }

    /// Audits every trading request still unanswered (the connection ended).
    fn give_up_pending(&mut self) {
        while let Some(given_up) = self.pending.pop_front() {
            self.audit(&given_up.request, "unanswered", None, None);
        }
    }

    /// A message from Kraken: an answer to a pending request is paired with
    /// it (and a refused token replaced and the request resent once), then
    /// everything goes to the consumer, scrubbed of the connection's tokens.
    async fn on_kraken_frame(
        &mut self,
        text: &str,
        to_kraken: &mut SplitSink<KrakenSocket, KrakenMessage>,
    ) -> Result<(), End> {
        if let Some(answer) = Answer::parse(text)
            && let Some(at) = self
                .pending
                .iter()
                .position(|p| p.request.method == answer.method && p.request.req_id() == answer.req_id.as_ref())
            && let Some(mut pending) = self.pending.remove(at)
        {
            if answer.refuses_token()
                && !pending.resent
                && let Some(refused) = pending.token
                && let Some(token) = self.replace_token(refused).await
            {
                self.state.metrics.relay().resent(&self.account).inc();
                debug!(consumer = %self.consumer.name, account = %self.account, method = %pending.request.method,
                    "relay: Kraken refused the injected token; the request is sent again with a new one");
                let text = pending.request.with_token(token.token.expose());
                self.send_to_kraken(to_kraken, text).await?;
                pending.resent = true;
                pending.token = Some(token.sha256);
                pending.sent = Instant::now();
                self.pending.insert(at, pending);
                return Ok(());
            }
            self.audit(&pending.request, "answered", Some(&answer), None);
        }
        let text = self.injected.scrub(text);
        self.send_to_consumer(Message::Text(text.into()))
    }

    /// Reports a token Kraken refused (coalesced with every other report of
    /// it, as `POST /v1/token/invalidate`) and returns its replacement.
    async fn replace_token(&mut self, refused: [u8; 32]) -> Option<Arc<CachedToken>> {
        let token = self.handle.invalidate(refused, &self.consumer.name).await.ok()?;
        if token.sha256 == refused {
            return None;
        }
        self.injected.note(&token);
        Some(token)
    }

    /// A `relay.order` line for a trading request, with the answer if any.
    fn audit(&self, request: &Request, outcome: &'static str, answer: Option<&Answer>, error: Option<&str>) {
        if let Some(audit) = &self.table.audit
            && request.is_trading()
        {
            let line = order_line(
                Who {
                    consumer: &self.consumer.name,
                    account: &self.account,
                    peer: self.peer,
                },
                request,
                outcome,
                answer,
                error,
            );
            audit.record(Event::RelayOrder(Box::new(line)));
        }
    }
}

/// Writes queued frames to the consumer until the queue closes or a close
/// frame is sent.
async fn write_to_consumer(mut sink: SplitSink<WebSocket, Message>, mut queue: mpsc::Receiver<Message>) {
    while let Some(message) = queue.recv().await {
        let close = matches!(message, Message::Close(_));
        if sink.send(message).await.is_err() {
            return;
        }
        if close {
            return;
        }
    }
    let _ = sink.close().await;
}
