//! `GET /api/volumes/{volumeId}/events`: the changes of a volume's files as server-sent events,
//! read from the volume's change log, so they include what mounts on any host and the file API
//! did. One follower thread per volume with subscribers reads the log (waiting for commits, never
//! polling in a loop of its own) and hands each subscriber the events under its path through a
//! bounded queue. A subscriber that falls behind (its queue full) is dropped by the follower and
//! catches up from the log itself; a subscriber that resumes from an event id does the same
//! first. Events the log no longer holds (trimmed) are reported as one `lost` event.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use cellar_meta::{ChangeKind, FileKind, MetaEngine, PathChange, PathChangeBatch};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use utoipa::{IntoParams, ToSchema};

use super::extract::{ApiPath, ApiQuery};
use super::files::org_volume;
use super::{AppState, Org};
use crate::db::{volume_state, ControlDb};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::files::VolumePath;
use crate::lifecycle::Services;

/// How long one wait for commits lasts before the follower looks at its subscribers again.
const WAIT: Duration = Duration::from_millis(250);
/// Changes read per query (the follower's and a catching-up subscriber's).
const BATCH: usize = 1024;
/// Events queued for one subscriber before the follower drops it (it then reads the log).
const QUEUE: usize = 1024;
/// Events between a subscriber's task and its HTTP body.
const OUT_QUEUE: usize = 16;
/// How often a follower checks that its volume is still ready (not being deleted).
const STATE_CHECK: Duration = Duration::from_secs(2);
/// Pause after a failed read of the log.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Failures logged while the log stays unreadable: the first, then one in this many.
const LOG_EVERY_FAILURES: u32 = 30;

#[derive(Debug, Deserialize, IntoParams)]
pub struct EventsQuery {
    /// Only events for this path and what is under it (default `/`, the whole volume). It
    /// need not exist yet.
    #[serde(default = "root")]
    pub path: String,
    /// Resume after this event id (as `Last-Event-ID` does; the header wins).
    pub after: Option<u64>,
}

fn root() -> String {
    "/".to_string()
}

/// The `data` of a created, modified, removed or renamed event (the SSE `event` is the kind,
/// its `id` the change's position in the volume's change log).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChangeEvent {
    /// Absolute path in the volume; of a rename, the new one.
    pub path: String,
    /// created, modified, removed or renamed.
    pub kind: String,
    pub is_dir: bool,
    /// Of a rename: the path before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_path: Option<String>,
    /// The file's size when the server read the change (absent once it is gone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Its modification time then, RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtime: Option<String>,
}

/// The `data` of a `lost` event: changes after the client's position were trimmed from the log
/// before it read them, so it must rescan what it watches. Its id is where the stream goes on.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LostEvent {
    /// The event id the stream continues after.
    pub resume_after: u64,
    pub message: String,
}

/// One server-sent event as it is framed on the wire (`event:`, `id:`, `data:`), for the API
/// document: a change kind with a [`ChangeEvent`] as its JSON data, or `lost` with a
/// [`LostEvent`].
pub struct EventFrame;

impl utoipa::PartialSchema for EventFrame {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        use utoipa::openapi::Ref;
        let frame = |kinds: &[&str], data: &str| {
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .property(
                    "event",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .enum_values(Some(kinds.iter().copied())),
                )
                .required("event")
                .property(
                    "id",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .pattern(Some("^[0-9]+$")),
                )
                .required("id")
                .property(
                    "data",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .content_media_type("application/json")
                        .content_schema(Some(Ref::from_schema_name(data))),
                )
                .required("data")
        };
        OneOfBuilder::new()
            .item(frame(
                &["created", "modified", "removed", "renamed"],
                "ChangeEvent",
            ))
            .item(frame(&["lost"], "LostEvent"))
            .into()
    }
}

impl utoipa::ToSchema for EventFrame {}

/// One event, rendered once for every subscriber.
struct Rendered {
    seq: u64,
    kind: &'static str,
    path: String,
    old_path: Option<String>,
    data: String,
}

impl Rendered {
    fn new(change: &PathChange) -> Option<Rendered> {
        // An upload's reserved names never show (as in listings): its file appears at once,
        // complete, so its rename onto the name is a creation.
        let reserved = |path: &[u8]| {
            crate::files::is_upload_name(path.rsplit(|&b| b == b'/').next().unwrap_or_default())
        };
        if reserved(&change.path) {
            return None;
        }
        let old_path = change.old_path.as_deref().filter(|old| !reserved(old));
        let kind = match change.kind {
            ChangeKind::Created => "created",
            ChangeKind::Modified => "modified",
            ChangeKind::Removed => "removed",
            ChangeKind::Renamed if old_path.is_some() => "renamed",
            ChangeKind::Renamed => "created",
            ChangeKind::Other | ChangeKind::MovedAway => return None,
        };
        let text = |path: &[u8]| String::from_utf8_lossy(path).into_owned();
        let event = ChangeEvent {
            path: text(&change.path),
            kind: kind.to_string(),
            is_dir: change.node == Some(FileKind::Directory),
            old_path: old_path.map(text),
            size: change.attr.as_ref().map(|attr| attr.size),
            mtime: change.attr.as_ref().map(|attr| {
                let at = UNIX_EPOCH + Duration::from_nanos(attr.mtime_ns.max(0) as u64);
                humantime::format_rfc3339_nanos(at).to_string()
            }),
        };
        Some(Rendered {
            seq: change.seq,
            kind,
            data: serde_json::to_string(&event).ok()?,
            path: event.path,
            old_path: event.old_path,
        })
    }

    /// Whether a subscriber of `filter` gets it: a rename counts on either side.
    fn is_under(&self, filter: &str) -> bool {
        is_under(&self.path, filter)
            || self
                .old_path
                .as_deref()
                .is_some_and(|old| is_under(old, filter))
    }

    fn sse(&self) -> Event {
        Event::default()
            .id(self.seq.to_string())
            .event(self.kind)
            .data(&self.data)
    }
}

/// `path` is `filter` or below it (whole components: `/ab` is not under `/a`).
fn is_under(path: &str, filter: &str) -> bool {
    filter == "/"
        || path
            .strip_prefix(filter)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

fn lost_event(resume_after: u64) -> Event {
    let body = LostEvent {
        resume_after,
        message: "changes were trimmed from the volume's change log before this client read them: \
                  rescan what you watch"
            .to_string(),
    };
    Event::default()
        .id(resume_after.to_string())
        .event("lost")
        .data(serde_json::to_string(&body).unwrap_or_default())
}

enum Item {
    Event(Arc<Rendered>),
    /// The follower lost changes (it fell behind the log's trimming); it goes on after `resume`.
    Lost {
        resume: u64,
    },
}

struct Subscriber {
    filter: String,
    queue: mpsc::Sender<Item>,
}

/// Where the follower is in the log, and who listens.
struct Live {
    position: u64,
    subscribers: Vec<Subscriber>,
}

/// The follower of one volume's change log.
struct Follower {
    volume_id: String,
    meta: Arc<dyn MetaEngine>,
    live: Mutex<Live>,
    /// Set under `live`'s lock: a stopped follower takes no subscriber.
    stopped: AtomicBool,
    /// Stopped for good (the volume is no longer ready, the server stops): its streams end
    /// rather than subscribe again.
    ended: AtomicBool,
}

impl Follower {
    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A queue of the events under `filter` after the returned position; None once stopped.
    fn subscribe(&self, filter: &str) -> Option<(mpsc::Receiver<Item>, u64)> {
        let mut live = self.live();
        if self.stopped.load(Ordering::SeqCst) {
            return None;
        }
        let (queue, events) = mpsc::channel(QUEUE);
        live.subscribers.push(Subscriber {
            filter: filter.to_string(),
            queue,
        });
        Some((events, live.position))
    }

    /// Stops for good and closes every subscriber's queue.
    fn end(&self) {
        let mut live = self.live();
        self.ended.store(true, Ordering::SeqCst);
        self.stopped.store(true, Ordering::SeqCst);
        live.subscribers.clear();
    }

    /// Hands the events to the subscribers under whose path they are; drops those whose
    /// queue is full (they catch up from the log) or closed.
    fn publish(&self, events: &[Arc<Rendered>], upto: u64) {
        let mut live = self.live();
        live.subscribers.retain(|subscriber| {
            events
                .iter()
                .filter(|event| event.is_under(&subscriber.filter))
                .all(|event| {
                    subscriber
                        .queue
                        .try_send(Item::Event(event.clone()))
                        .is_ok()
                })
        });
        live.position = upto;
    }

    fn publish_lost(&self, resume: u64) {
        let mut live = self.live();
        live.subscribers
            .retain(|subscriber| subscriber.queue.try_send(Item::Lost { resume }).is_ok());
        live.position = resume;
    }
}

/// The followers of this server, one per volume with subscribers.
#[derive(Default)]
pub struct EventHub {
    followers: Mutex<HashMap<String, Arc<Follower>>>,
    /// The server is stopping: no new follower.
    closed: AtomicBool,
}

impl EventHub {
    fn followers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Follower>>> {
        self.followers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends every event stream (the server is stopping: its open responses must end).
    pub fn close_all(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for (_, follower) in self.followers().drain() {
            follower.end();
        }
    }

    /// A subscription to the volume's events under `filter`: its follower (started if none
    /// runs), the queue and the position it starts after.
    async fn subscribe(
        self: &Arc<Self>,
        services: &Arc<Services>,
        volume_id: &str,
        filter: &str,
    ) -> ApiResult<(Arc<Follower>, mpsc::Receiver<Item>, u64)> {
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return Err(ApiError::new(
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "the server is stopping",
                ));
            }
            let running = self.followers().get(volume_id).cloned();
            let follower = match running {
                Some(follower) => follower,
                None => self.start(services, volume_id).await?,
            };
            // None: it stopped meanwhile (its last subscriber left); the next one starts.
            if let Some((events, position)) = follower.subscribe(filter) {
                return Ok((follower, events, position));
            }
        }
    }

    /// Opens the volume's metadata and starts its follower, unless another request just did.
    async fn start(
        self: &Arc<Self>,
        services: &Arc<Services>,
        volume_id: &str,
    ) -> ApiResult<Arc<Follower>> {
        let url = services.volume_config(volume_id).meta_url;
        let (meta, position) = super::blocking(move || {
            let meta = cellar_meta::open(&url)?;
            let position = meta.last_change()?;
            Ok::<_, anyhow::Error>((meta, position))
        })
        .await?;
        let mut followers = self.followers();
        if let Some(follower) = followers.get(volume_id) {
            return Ok(follower.clone());
        }
        let follower = Arc::new(Follower {
            volume_id: volume_id.to_string(),
            meta,
            live: Mutex::new(Live {
                position,
                subscribers: Vec::new(),
            }),
            stopped: AtomicBool::new(false),
            ended: AtomicBool::new(false),
        });
        followers.insert(volume_id.to_string(), follower.clone());
        drop(followers);
        let (hub, db, running) = (self.clone(), services.db.clone(), follower.clone());
        let started = std::thread::Builder::new()
            .name("cellar-events".into())
            .spawn(move || hub.follow(&running, &db));
        if let Err(e) = started {
            follower.end();
            self.leave(&follower);
            return Err(ApiError::internal(format!(
                "starting the change follower: {e}"
            )));
        }
        tracing::info!(volume = %volume_id, "following the volume's change log for events");
        Ok(follower)
    }

    /// Stops `follower` and forgets it (if it is still the volume's).
    fn leave(&self, follower: &Arc<Follower>) {
        self.leave_unless_used(follower, false);
    }

    /// [`Self::leave`] if `only_unused` is false or no one listens any more; whether it left.
    /// The hub's lock is taken first: a request finds either this follower with its new
    /// subscriber, or none and starts another.
    fn leave_unless_used(&self, follower: &Arc<Follower>, only_unused: bool) -> bool {
        let mut followers = self.followers();
        let mut live = follower.live();
        live.subscribers
            .retain(|subscriber| !subscriber.queue.is_closed());
        if only_unused && !live.subscribers.is_empty() && !follower.stopped.load(Ordering::SeqCst) {
            return false;
        }
        if followers
            .get(&follower.volume_id)
            .is_some_and(|known| Arc::ptr_eq(known, follower))
        {
            followers.remove(&follower.volume_id);
        }
        follower.stopped.store(true, Ordering::SeqCst);
        live.subscribers.clear();
        true
    }

    /// The follower's thread: reads the log as commits come, until no one listens, the volume
    /// stops being ready or the server stops.
    fn follow(&self, follower: &Arc<Follower>, db: &ControlDb) {
        let meta = &follower.meta;
        let mut checked = Instant::now();
        let mut failures = 0u32;
        loop {
            if self.leave_unless_used(follower, true) {
                break;
            }
            if checked.elapsed() >= STATE_CHECK {
                checked = Instant::now();
                match db.volume_by_id_in_any_org(&follower.volume_id) {
                    Ok(Some(volume)) if volume.state == volume_state::READY => {}
                    Ok(_) => {
                        tracing::info!(volume = %follower.volume_id, "the volume is no longer ready: its event streams end");
                        follower.end();
                        self.leave(follower);
                        break;
                    }
                    Err(e) => tracing::warn!(error = %e, "checking the state of a followed volume"),
                }
            }
            let position = follower.live().position;
            let batch = meta
                .wait_for_changes(position, WAIT)
                .and_then(|()| meta.path_changes_since(position, BATCH));
            let failed = match batch {
                Ok(PathChangeBatch::Changes { upto, events }) => {
                    let rendered: Vec<Arc<Rendered>> = events
                        .iter()
                        .filter_map(Rendered::new)
                        .map(Arc::new)
                        .collect();
                    follower.publish(&rendered, upto);
                    None
                }
                Ok(PathChangeBatch::Lost) => match meta.last_change() {
                    Ok(end) => {
                        tracing::warn!(volume = %follower.volume_id, position, "the event follower fell behind the change log's trimming");
                        follower.publish_lost(end);
                        None
                    }
                    Err(e) => Some(e),
                },
                Err(e) => Some(e),
            };
            match failed {
                None => failures = 0,
                Some(e) => {
                    if failures.is_multiple_of(LOG_EVERY_FAILURES) {
                        tracing::warn!(volume = %follower.volume_id, error = %e, "reading the change log for events failed; retrying");
                    }
                    failures += 1;
                    std::thread::sleep(RETRY_AFTER);
                }
            }
        }
    }
}

/// One client's stream: what it must catch up on from the log, then the follower's queue.
struct Stream {
    hub: Arc<EventHub>,
    services: Arc<Services>,
    volume_id: String,
    filter: String,
    /// The last position this stream delivered or went past (None: from where it subscribed).
    cursor: Option<u64>,
    out: mpsc::Sender<Event>,
}

impl Stream {
    /// Runs until the client goes, the follower stops, or the log cannot be read.
    async fn run(
        mut self,
        mut follower: Arc<Follower>,
        mut events: mpsc::Receiver<Item>,
        mut position: u64,
    ) {
        loop {
            if let Some(from) = self.cursor.filter(|from| *from < position) {
                if !self.catch_up(&follower, from, position).await {
                    return;
                }
            }
            self.cursor = Some(self.cursor.map_or(position, |cursor| cursor.max(position)));
            loop {
                let item = tokio::select! {
                    item = events.recv() => item,
                    () = self.out.closed() => return,
                };
                let event = match item {
                    None => break,
                    Some(Item::Event(event)) if self.cursor.is_some_and(|c| event.seq > c) => {
                        self.cursor = Some(event.seq);
                        event.sse()
                    }
                    Some(Item::Event(_)) => continue,
                    Some(Item::Lost { resume }) => {
                        self.cursor = Some(resume);
                        lost_event(resume)
                    }
                };
                if self.out.send(event).await.is_err() {
                    return;
                }
            }
            if follower.ended.load(Ordering::SeqCst) {
                return;
            }
            // The follower dropped this stream (its queue was full; it may have stopped with
            // it, its last subscriber): go on from the log, with it or a new one.
            match self
                .hub
                .subscribe(&self.services, &self.volume_id, &self.filter)
                .await
            {
                Ok((again, queue, at)) => (follower, events, position) = (again, queue, at),
                Err(_) => return,
            }
        }
    }

    /// Sends the events in (from, to] under the filter, read from the log; a `lost` event if
    /// the log no longer has them. False when the stream must end.
    async fn catch_up(&mut self, follower: &Follower, mut from: u64, to: u64) -> bool {
        while from < to {
            let meta = follower.meta.clone();
            let batch = super::blocking(move || {
                meta.path_changes_since(from, BATCH)
                    .map_err(anyhow::Error::from)
            })
            .await;
            match batch {
                Ok(PathChangeBatch::Changes { upto, events }) => {
                    for event in events.iter().filter(|event| event.seq <= to) {
                        let Some(event) = Rendered::new(event) else {
                            continue;
                        };
                        if event.is_under(&self.filter) && self.out.send(event.sse()).await.is_err()
                        {
                            return false;
                        }
                    }
                    if upto <= from {
                        break;
                    }
                    from = upto;
                }
                Ok(PathChangeBatch::Lost) => {
                    return self.out.send(lost_event(to)).await.is_ok();
                }
                Err(e) => {
                    tracing::warn!(volume = %self.volume_id, "reading the change log for a resumed event stream: {}", e.message);
                    return false;
                }
            }
        }
        true
    }
}

#[utoipa::path(
    get, operation_id = "volumeEvents", path = "/api/volumes/{volumeId}/events", tag = "volume files",
    params(
        ("volumeId" = String, Path, description = "Volume id or name"),
        EventsQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event id (sent by EventSource clients when they reconnect)"),
    ),
    responses(
        (status = 200, description = "Server-sent events: `event:` created, modified, removed, renamed (data: ChangeEvent) or lost (data: LostEvent); `id:` the change's position in the volume's change log", content_type = "text/event-stream", body = EventFrame),
        (status = 404, description = "no such volume", body = ErrorBody),
        (status = 409, description = "the volume is not ready", body = ErrorBody),
        (status = 503, description = "the server is stopping", body = ErrorBody)
    )
)]
pub async fn events(
    State(state): State<AppState>,
    Extension(Org(org)): Extension<Org>,
    ApiPath(volume_key): ApiPath<String>,
    ApiQuery(query): ApiQuery<EventsQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let filter = VolumePath::parse(&query.path)?.as_string();
    let after = match headers.get("last-event-id") {
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|id| id.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "Last-Event-ID must be an event id of this stream (a number)",
                    )
                })?,
        ),
        None => query.after,
    };
    let volume = org_volume(&state, org, &volume_key).await?;
    if volume.state != volume_state::READY {
        return Err(ApiError::conflict(format!(
            "volume {} (state {}) has no change events: only a ready volume has",
            volume.id, volume.state
        ))
        .with_code("VOLUME_NOT_READY"));
    }
    let (follower, events, position) = state
        .events
        .subscribe(&state.services, &volume.id, &filter)
        .await?;
    if let Some(after) = after {
        let meta = follower.meta.clone();
        let end = super::blocking(move || meta.last_change().map_err(anyhow::Error::from)).await?;
        if after > end {
            return Err(ApiError::bad_request(format!(
                "event id {after} is past the end of the volume's change log ({end}): not an id of this volume's events"
            )));
        }
    }
    let (out, body) = mpsc::channel(OUT_QUEUE);
    let stream = Stream {
        hub: state.events.clone(),
        services: state.services.clone(),
        volume_id: volume.id,
        filter,
        cursor: after,
        out,
    };
    tokio::spawn(stream.run(follower, events, position));
    let body = futures::stream::unfold(body, |mut body| async move {
        body.recv()
            .await
            .map(|event| (Ok::<_, Infallible>(event), body))
    });
    Ok(Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response())
}
