//! The registry of job handlers, shared by the worker and by inline producers.

use crate::error::BoxError;
use faktory::Job;
use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

pub(crate) type HandlerFn<C> = dyn Fn(&Job, &mut C) -> Result<(), BoxError> + Send + Sync;
pub(crate) type DetachedFn = dyn Fn(&Job) -> Result<(), BoxError> + Send + Sync;

/// A handler: one that runs inside the worker transaction consuming the barrier, with its
/// connection, or one that takes none.
pub(crate) enum Handler<C> {
    Connected(Arc<HandlerFn<C>>),
    Detached(Arc<DetachedFn>),
}

impl<C> Clone for Handler<C> {
    fn clone(&self) -> Self {
        match self {
            Handler::Connected(f) => Handler::Connected(Arc::clone(f)),
            Handler::Detached(f) => Handler::Detached(Arc::clone(f)),
        }
    }
}

/// Whether a job kind must arrive with a barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BarrierMode {
    Required,
    Optional,
}

pub(crate) struct Registration<C> {
    pub(crate) handler: Handler<C>,
    pub(crate) mode: BarrierMode,
}

impl<C> Clone for Registration<C> {
    fn clone(&self) -> Self {
        Registration {
            handler: self.handler.clone(),
            mode: self.mode,
        }
    }
}

/// Job handlers by job kind, for connections of type `C`.
///
/// A handler receives the job and a connection that is inside the transaction which consumes
/// the job's barrier: what the handler writes through it commits together with the
/// consumption, so those writes happen exactly once even if Faktory delivers the job twice.
///
/// The same `Handlers` can be given to a [`WorkerBuilder`](crate::WorkerBuilder) and to
/// [`Producer::inline`](crate::Producer::inline).
pub struct Handlers<C> {
    pub(crate) map: HashMap<String, Registration<C>>,
}

impl<C> Clone for Handlers<C> {
    fn clone(&self) -> Self {
        Handlers {
            map: self.map.clone(),
        }
    }
}

impl<C> Default for Handlers<C> {
    fn default() -> Self {
        Handlers {
            map: HashMap::new(),
        }
    }
}

impl<C> fmt::Debug for Handlers<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kinds: Vec<_> = self
            .map
            .iter()
            .map(|(k, r)| {
                (
                    k.as_str(),
                    r.mode == BarrierMode::Required,
                    matches!(r.handler, Handler::Connected(_)),
                )
            })
            .collect();
        kinds.sort();
        f.debug_struct("Handlers")
            .field("kinds (barrier required, takes a connection)", &kinds)
            .finish()
    }
}

impl<C: 'static> Handlers<C> {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` for jobs of `kind`. Such jobs must be pushed with
    /// [`enqueue_with_barrier`](crate::EnqueueWithBarrier::enqueue_with_barrier): a job of this
    /// kind pushed any other way fails with [`Error::BarrierRequired`](crate::Error::BarrierRequired).
    ///
    /// Registering a kind twice replaces the first handler.
    pub fn register<K, F, E>(mut self, kind: K, handler: F) -> Self
    where
        K: Into<String>,
        F: Fn(&Job, &mut C) -> Result<(), E> + Send + Sync + 'static,
        E: Into<BoxError>,
    {
        self.insert(kind.into(), handler, BarrierMode::Required);
        self
    }

    /// Registers `handler` for jobs of `kind`, which may also arrive without a barrier (a plain
    /// Faktory push): those run at once. Jobs that do carry a barrier still wait for it.
    pub fn register_without_barrier<K, F, E>(mut self, kind: K, handler: F) -> Self
    where
        K: Into<String>,
        F: Fn(&Job, &mut C) -> Result<(), E> + Send + Sync + 'static,
        E: Into<BoxError>,
    {
        self.insert(kind.into(), handler, BarrierMode::Optional);
        self
    }

    /// Registers `handler`, which takes no database connection, for jobs of `kind` — a job
    /// that sends an email or calls an API, and writes nothing to the database. Such jobs must
    /// be pushed with [`enqueue_with_barrier`](crate::EnqueueWithBarrier::enqueue_with_barrier),
    /// as for [`register`](Self::register).
    ///
    /// The handler still runs only once the producer's transaction has committed, and never
    /// after it rolled back. What changes is how the barrier is consumed: with no writes of the
    /// handler's to commit together with it, the worker holds no connection while the handler
    /// runs, and deletes the barriers of finished jobs in batches — one statement and one
    /// commit for all the jobs that finished while the previous batch committed — and
    /// acknowledges each job only once its barrier's deletion has committed. That is what
    /// makes barrier jobs nearly as cheap as plain ones (see the README's "Performance").
    ///
    /// The price is in "exactly once", which such a handler could not have anyway (its effects
    /// are outside the database): a job runs **at least once**. It runs again if the worker
    /// dies between the handler's end and its barrier's deletion (Faktory delivers it again),
    /// and two deliveries of one job may run at once in two worker processes (a reconciler's
    /// copy while the first still runs); one worker process never runs two at once. A handler
    /// that must not repeat its effect should make it idempotent (a key the API deduplicates
    /// on, say) — or take a connection, and record it in the consuming transaction.
    ///
    /// Registering a kind twice replaces the first handler.
    pub fn register_without_connection<K, F, E>(mut self, kind: K, handler: F) -> Self
    where
        K: Into<String>,
        F: Fn(&Job) -> Result<(), E> + Send + Sync + 'static,
        E: Into<BoxError>,
    {
        let handler: Arc<DetachedFn> = Arc::new(move |job: &Job| handler(job).map_err(Into::into));
        self.map.insert(
            kind.into(),
            Registration {
                handler: Handler::Detached(handler),
                mode: BarrierMode::Required,
            },
        );
        self
    }

    fn insert<F, E>(&mut self, kind: String, handler: F, mode: BarrierMode)
    where
        F: Fn(&Job, &mut C) -> Result<(), E> + Send + Sync + 'static,
        E: Into<BoxError>,
    {
        let handler: Arc<HandlerFn<C>> =
            Arc::new(move |job: &Job, conn: &mut C| handler(job, conn).map_err(Into::into));
        self.map.insert(
            kind,
            Registration {
                handler: Handler::Connected(handler),
                mode,
            },
        );
    }

    /// Whether some kind's handler takes no connection.
    pub(crate) fn any_detached(&self) -> bool {
        self.map
            .values()
            .any(|r| matches!(r.handler, Handler::Detached(_)))
    }

    /// The registered job kinds.
    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    pub(crate) fn get(&self, kind: &str) -> Option<&Registration<C>> {
        self.map.get(kind)
    }
}

/// Type-erased handlers, so that a [`Producer`](crate::Producer) need not be generic over the
/// connection type.
pub(crate) trait ErasedHandlers: Send + Sync {
    fn as_any(&self) -> &dyn Any;
    /// The connection type the handlers take.
    fn connection_type(&self) -> &'static str;
}

impl<C: Send + 'static> ErasedHandlers for Handlers<C> {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn connection_type(&self) -> &'static str {
        std::any::type_name::<C>()
    }
}
