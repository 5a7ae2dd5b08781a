//! The delivery worker `serve` runs: one task per subscription, each delivering the events
//! after its subscription's cursor, in order, one at a time.
//!
//! - *Waking*: a supervisor reads the log's head and the subscription ids every
//!   `poll_interval` (one primary-key read and one small listing), and at once when this
//!   process commits an event (`Metadata::event_committed`); it starts a task for each new
//!   subscription and tells the tasks when the head moved; a task with nothing to do sleeps
//!   until then.
//! - *Order*: a task always delivers the lowest parked delivery queued by a replay, else the
//!   first wanted event after the cursor; the cursor moves past an event only once it was
//!   delivered (2xx) or parked. So event n+1 never goes out before n succeeded or was parked.
//! - *Retries*: a failed attempt (no answer within `timeout`, a refused connection, a non-2xx
//!   status, a redirect) is tried again after 1 s, 2 s, 4 s, ... capped at `backoff_max`;
//!   after `max_attempts` failures the delivery is parked and the cursor moves on (parking
//!   does not block later events), until a replay queues it again.
//! - *Several nodes*: before each attempt a task takes or renews its subscription's lease (a
//!   row update by the database's clock, for twice the timeout plus a second); every state
//!   change is fenced by it. Only the lease holder sends, so each event goes out once per
//!   subscription; a node that dies holding a lease delays delivery by at most the lease.
//! - *Memory*: events are read a page at a time, whatever the backlog.
//! - *Shutdown*: tasks stop at the next await (an attempt cut short is simply sent again
//!   later: at least once) and give their leases up.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{cloudevent, event_id, secret_key, sign, wants};
use crate::metadata::events::{self, Event};
use crate::metadata::webhooks::{self as queries, Attempt, Outcome, WebhookRow};
use crate::metadata::{Metadata, MetadataError};

/// Events read at once when looking for the next one a subscription wants.
const PAGE: i64 = 200;

/// How the worker delivers.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Failed attempts after which a delivery is parked.
    pub max_attempts: u32,
    /// Bound on one attempt: connecting, sending, and the receiver's answer.
    pub timeout: Duration,
    /// Longest wait between two attempts.
    pub backoff_max: Duration,
    /// How often the log's head is looked at.
    pub poll_interval: Duration,
    /// The CloudEvents `source`: the registry's public URL, or `urn:berth:<service>`.
    pub source: String,
}

pub struct Worker {
    metadata: Metadata,
    client: reqwest::Client,
    options: WorkerOptions,
    /// This process, as lease owner.
    node: String,
    metrics: DeliveryMetrics,
}

/// What `/metrics` shows of delivery (registered by [`Worker::register_metrics`]).
#[derive(Clone)]
struct DeliveryMetrics {
    /// Attempts by outcome: `delivered`, `failed` (to be retried) or `parked`.
    attempts: Family<OutcomeLabel, Counter>,
    /// Seconds from sending a delivery to the receiver's answer.
    latency: Histogram,
    /// Per subscription: events after its cursor up to the log's head (an upper bound on its
    /// queue: the filters may skip some). Its growth is the delivery lag.
    pending: Family<SubscriptionLabel, Gauge>,
    /// The event log's head (its last sequence number), as this node last read it.
    head: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// Subscriptions are few and made by operators, so labelling by them stays bounded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SubscriptionLabel {
    subscription: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

impl DeliveryMetrics {
    fn new() -> DeliveryMetrics {
        DeliveryMetrics {
            attempts: Family::default(),
            latency: latency_histogram(),
            pending: Family::default(),
            head: Gauge::default(),
        }
    }
}

/// What a task does after a step.
enum Next {
    /// The subscription is gone.
    Gone,
    /// Go on at once: something was delivered, parked or skipped.
    Again,
    /// Nothing to deliver until the log's head moves.
    Idle,
    /// Wait until then (a backoff, or another node's lease).
    Until(Instant),
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An error and its causes on one line (reqwest keeps the useful part in the sources).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl Worker {
    pub fn new(metadata: Metadata, options: WorkerOptions) -> Result<Worker, String> {
        let client = reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(options.timeout.min(Duration::from_secs(5)))
            // A receiver answers 2xx; a redirect is a failure, not a hop to somewhere else.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("berth-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("building the webhook HTTP client: {e}"))?;
        Ok(Worker {
            metadata,
            client,
            options,
            node: uuid::Uuid::new_v4().simple().to_string(),
            metrics: DeliveryMetrics::new(),
        })
    }

    /// Puts the delivery metrics on `/metrics`.
    pub fn register_metrics(&self, metrics: &crate::metrics::Metrics) {
        let m = &self.metrics;
        metrics.register(
            "berth_webhook_attempts",
            "Webhook delivery attempts by outcome (delivered, failed and to be retried, parked)",
            m.attempts.clone(),
        );
        metrics.register(
            "berth_webhook_delivery_seconds",
            "Time from sending a webhook delivery to the receiver's answer",
            m.latency.clone(),
        );
        metrics.register(
            "berth_webhook_pending_events",
            "Events after a subscription's cursor up to the log's head (its queue, an upper bound)",
            m.pending.clone(),
        );
        metrics.register(
            "berth_event_log_head",
            "The event log's last sequence number, as this node last read it",
            m.head.clone(),
        );
    }

    /// The lease: long enough for an attempt and the writes around it.
    fn lease_ms(&self) -> i64 {
        (self.options.timeout * 2 + Duration::from_secs(1)).as_millis() as i64
    }

    /// Wait before attempt `failures + 1`: 1 s, 2 s, 4 s, ... capped at `backoff_max`.
    fn backoff(&self, failures: i64) -> Duration {
        let exp = failures.clamp(1, 30) as u32 - 1;
        Duration::from_secs(1u64 << exp).min(self.options.backoff_max)
    }

    /// Delivers until `stop` turns true; then waits for the tasks (each stops at its next
    /// await) and returns.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        tracing::info!(node = %self.node, "webhook delivery started");
        let (head_tx, head_rx) = watch::channel(0i64);
        let mut tasks: HashMap<String, JoinHandle<()>> = HashMap::new();
        let mut failing = false;
        loop {
            let looked = self
                .metadata
                .read(|tx| {
                    Box::pin(async move {
                        let (head, _) = events::head(tx).await?;
                        Ok((head, queries::ids(tx).await?))
                    })
                })
                .await;
            match looked {
                Ok((head, ids)) => {
                    failing = false;
                    self.metrics.head.set(head);
                    head_tx.send_if_modified(|h| {
                        let moved = *h != head;
                        *h = head;
                        moved
                    });
                    tasks.retain(|_, task| !task.is_finished());
                    for id in ids {
                        if let std::collections::hash_map::Entry::Vacant(slot) = tasks.entry(id) {
                            let id = slot.key().clone();
                            slot.insert(tokio::spawn(self.clone().drive(
                                id,
                                head_rx.clone(),
                                stop.clone(),
                            )));
                        }
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "webhooks: cannot read the event log; retrying");
                    }
                    failing = true;
                }
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                // Events committed by this process are noticed at once, other nodes' by polling.
                _ = self.metadata.event_committed() => {}
                _ = tokio::time::sleep(self.options.poll_interval) => {}
            }
        }
        for (_, task) in tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout(self.options.timeout, task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        tracing::info!("webhook delivery stopped");
    }

    /// One subscription's task.
    async fn drive(
        self: Arc<Self>,
        id: String,
        mut head: watch::Receiver<i64>,
        mut stop: watch::Receiver<bool>,
    ) {
        // One warning per outage, not one per retry.
        let mut failing = false;
        loop {
            let known_head = *head.borrow_and_update();
            let next = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                next = self.step(&id, known_head) => next,
            };
            if next.is_ok() && failing {
                tracing::info!(webhook.id = %id, "webhook delivery resumed");
                failing = false;
            }
            let until = match next {
                Ok(Next::Gone) => return,
                Ok(Next::Again) => continue,
                Ok(Next::Idle) => None,
                Ok(Next::Until(at)) => Some(at),
                Err(e) => {
                    if !failing {
                        tracing::warn!(webhook.id = %id, error = %e, "webhook delivery paused: the metadata store failed; retrying");
                    }
                    failing = true;
                    Some(Instant::now() + self.options.poll_interval * 4)
                }
            };
            // Idle: the head moving wakes it; the timer notices a replay queued through the API.
            let at = until.unwrap_or_else(|| Instant::now() + self.options.poll_interval * 4);
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = head.changed(), if until.is_none() => {}
                _ = tokio::time::sleep_until(at) => {}
            }
        }
        // Let another node (or this one, restarted) go on at once.
        let (id, node) = (id.as_str(), self.node.as_str());
        let release = self
            .metadata
            .write(|tx| Box::pin(queries::release_lease(tx, id, node)));
        let _ = tokio::time::timeout(Duration::from_secs(2), release).await;
    }

    /// Delivers at most one event (or skips a page of unwanted ones).
    async fn step(&self, id: &str, head: i64) -> Result<Next, MetadataError> {
        let now = now_ms();
        let looked = self
            .metadata
            .read(|tx| {
                Box::pin(async move {
                    let Some(hook) = queries::get(tx, id).await? else {
                        return Ok(None);
                    };
                    Ok(Some((hook, queries::next_replay(tx, id).await?)))
                })
            })
            .await?;
        let Some((hook, replay)) = looked else {
            return Ok(Next::Gone);
        };
        let state = &hook.state;
        self.metrics
            .pending
            .get_or_create(&SubscriptionLabel {
                subscription: hook.id.clone(),
            })
            .set((head - state.cursor_seq).max(0));
        if state.cursor_seq >= head && replay.is_none() {
            return Ok(Next::Idle);
        }
        if state.next_attempt_ms > now {
            let wait = Duration::from_millis((state.next_attempt_ms - now) as u64);
            return Ok(Next::Until(Instant::now() + wait));
        }
        let poll = Instant::now() + self.options.poll_interval;
        let mine = state.lease_owner.as_deref() == Some(self.node.as_str());
        if !mine && state.lease_owner.is_some() && state.lease_until_ms > now {
            // Another node delivers for it (by this node's clock; the update below decides).
            return Ok(Next::Until(poll));
        }
        let (node, ttl) = (self.node.as_str(), self.lease_ms());
        let leased = self
            .metadata
            .write(|tx| Box::pin(queries::take_lease(tx, id, node, ttl)))
            .await?;
        if !leased {
            return Ok(Next::Until(poll));
        }
        // The cursor may have moved while another node held the lease: read it again.
        let Some(hook) = self
            .metadata
            .read(|tx| Box::pin(queries::get(tx, id)))
            .await?
        else {
            return Ok(Next::Gone);
        };
        let (event, replay) = match replay {
            Some(seq) => match self.event(seq).await? {
                Some(event) => (event, true),
                None => {
                    self.metadata
                        .write(|tx| Box::pin(queries::forget_parked(tx, id, seq)))
                        .await?;
                    return Ok(Next::Again);
                }
            },
            None => {
                let cursor = hook.state.cursor_seq;
                let page = self
                    .metadata
                    .read(|tx| Box::pin(events::after(tx, cursor, PAGE)))
                    .await?;
                let Some(last) = page.last().map(|e| e.seq) else {
                    return Ok(Next::Idle);
                };
                match page.into_iter().find(|e| wants(&hook, e)) {
                    Some(event) => (event, false),
                    None => {
                        self.metadata
                            .write(|tx| Box::pin(queries::skip_to(tx, id, node, last)))
                            .await?;
                        return Ok(Next::Again);
                    }
                }
            }
        };
        self.attempt(&hook, &event, replay).await
    }

    /// The event numbered `seq`, if the log still has it.
    async fn event(&self, seq: i64) -> Result<Option<Event>, MetadataError> {
        let found = self
            .metadata
            .read(|tx| Box::pin(events::after(tx, seq - 1, 1)))
            .await?;
        Ok(found.into_iter().next().filter(|e| e.seq == seq))
    }

    /// Sends `event` once and records how it went.
    async fn attempt(
        &self,
        hook: &WebhookRow,
        event: &Event,
        replay: bool,
    ) -> Result<Next, MetadataError> {
        let state = &hook.state;
        let failed_before = if state.attempt_seq == event.seq {
            state.failures
        } else {
            0
        };
        let started = Instant::now();
        let sent = self.post(hook, event).await;
        let latency_ms = started.elapsed().as_millis() as i64;
        self.metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        let now = now_ms();
        let failures = failed_before + i64::from(sent.is_err());
        let (outcome, next) = match &sent {
            Ok(()) => (Outcome::Delivered { latency_ms }, Next::Again),
            Err(error) if failures >= i64::from(self.options.max_attempts) => {
                tracing::warn!(
                    webhook.id = %hook.id,
                    event.seq = event.seq,
                    attempts = failures,
                    error = %error,
                    "webhook delivery parked"
                );
                (Outcome::Parked { error }, Next::Again)
            }
            Err(error) => {
                let wait = self.backoff(failures);
                tracing::info!(
                    webhook.id = %hook.id,
                    event.seq = event.seq,
                    attempts = failures,
                    retry_in_ms = wait.as_millis() as u64,
                    error = %error,
                    "webhook delivery failed"
                );
                let next_attempt_ms = now + wait.as_millis() as i64;
                (
                    Outcome::Failed {
                        error,
                        next_attempt_ms,
                    },
                    Next::Until(Instant::now() + wait),
                )
            }
        };
        let counted = match &outcome {
            Outcome::Delivered { .. } => "delivered",
            Outcome::Parked { .. } => "parked",
            Outcome::Failed { .. } => "failed",
        };
        self.metrics
            .attempts
            .get_or_create(&OutcomeLabel { outcome: counted })
            .inc();
        let attempt = Attempt {
            seq: event.seq,
            replay,
            failures,
        };
        let (id, node) = (hook.id.as_str(), self.node.as_str());
        let recorded = self
            .metadata
            .write(|tx| Box::pin(queries::record(tx, id, node, attempt, outcome, now)))
            .await?;
        if !recorded {
            // Another node took the subscription over while this one was sending; it goes on
            // from the cursor, so this event may reach the receiver twice (at least once).
            tracing::warn!(webhook.id = %hook.id, event.seq = event.seq, "webhook lease lost");
            return Ok(Next::Until(Instant::now() + self.options.poll_interval));
        }
        Ok(next)
    }

    /// POSTs the event as a signed CloudEvent; `Ok` on a 2xx answer.
    async fn post(&self, hook: &WebhookRow, event: &Event) -> Result<(), String> {
        let key = secret_key(&hook.secret)?;
        let body = serde_json::to_vec(&cloudevent(&self.options.source, event))
            .map_err(|e| format!("encoding the event: {e}"))?;
        let id = event_id(event);
        let timestamp = now_ms() / 1000;
        let signature = sign(&key, &id, timestamp, &body);
        let request = self
            .client
            .post(&hook.url)
            .header("content-type", "application/cloudevents+json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send();
        // reqwest's timeout covers the whole exchange; this bounds it whatever reqwest does.
        let response = tokio::time::timeout(self.options.timeout, request)
            .await
            .map_err(|_| format!("no answer within {:?}", self.options.timeout))?
            .map_err(|e| chain(&e))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {status}"))
        }
    }
}
