//! The registry of job handlers, shared by the worker and by inline producers.

use crate::error::BoxError;
use faktory::Job;
use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

pub(crate) type HandlerFn<C> = dyn Fn(&Job, &mut C) -> Result<(), BoxError> + Send + Sync;

/// Whether a job kind must arrive with a barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BarrierMode {
    Required,
    Optional,
}

pub(crate) struct Registration<C> {
    pub(crate) handler: Arc<HandlerFn<C>>,
    pub(crate) mode: BarrierMode,
}

impl<C> Clone for Registration<C> {
    fn clone(&self) -> Self {
        Registration {
            handler: Arc::clone(&self.handler),
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
            .map(|(k, r)| (k.as_str(), r.mode == BarrierMode::Required))
            .collect();
        kinds.sort();
        f.debug_struct("Handlers")
            .field("kinds (barrier required)", &kinds)
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

    fn insert<F, E>(&mut self, kind: String, handler: F, mode: BarrierMode)
    where
        F: Fn(&Job, &mut C) -> Result<(), E> + Send + Sync + 'static,
        E: Into<BoxError>,
    {
        let handler: Arc<HandlerFn<C>> =
            Arc::new(move |job: &Job, conn: &mut C| handler(job, conn).map_err(Into::into));
        self.map.insert(kind, Registration { handler, mode });
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
