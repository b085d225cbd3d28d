//! Services for the unit tests: an inner service whose calls the test finishes
//! by hand, and which counts how many of them run at once.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::oneshot;
use tower::Service;

use crate::error::BoxError;

/// How a call to [`Tracked`] ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    Ok,
    Err,
    Panic,
}

#[derive(Default)]
pub(crate) struct Books {
    pub(crate) active: AtomicUsize,
    pub(crate) max_active: AtomicUsize,
    pub(crate) calls: AtomicUsize,
    pub(crate) seen: Mutex<Vec<u64>>,
    senders: Mutex<HashMap<u64, oneshot::Sender<End>>>,
}

impl Books {
    pub(crate) fn active(&self) -> usize {
        self.active.load(SeqCst)
    }

    pub(crate) fn max_active(&self) -> usize {
        self.max_active.load(SeqCst)
    }

    pub(crate) fn seen(&self) -> Vec<u64> {
        self.seen.lock().unwrap().clone()
    }

    /// Ids of the calls that reached the service and have not ended.
    pub(crate) fn running(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.senders.lock().unwrap().keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Ends call `id`; false if it is not running.
    pub(crate) fn finish(&self, id: u64, end: End) -> bool {
        match self.senders.lock().unwrap().remove(&id) {
            Some(tx) => tx.send(end).is_ok(),
            None => false,
        }
    }
}

/// Always ready; each call runs until the test finishes it with [`Books::finish`].
#[derive(Clone, Default)]
pub(crate) struct Tracked {
    pub(crate) books: Arc<Books>,
}

/// Counts a call as running until its future ends or is dropped.
struct Active(Arc<Books>, u64);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.senders.lock().unwrap().remove(&self.1);
        self.0.active.fetch_sub(1, SeqCst);
    }
}

impl Service<u64> for Tracked {
    type Response = u64;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<u64, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, id: u64) -> Self::Future {
        let books = self.books.clone();
        let now = books.active.fetch_add(1, SeqCst) + 1;
        books.max_active.fetch_max(now, SeqCst);
        books.calls.fetch_add(1, SeqCst);
        books.seen.lock().unwrap().push(id);
        let (tx, rx) = oneshot::channel();
        books.senders.lock().unwrap().insert(id, tx);
        let active = Active(books, id);
        Box::pin(async move {
            let _active = active;
            match rx.await {
                Ok(End::Ok) => Ok(id),
                Ok(End::Err) => Err("inner failed".into()),
                Ok(End::Panic) => panic!("inner panicked"),
                Err(_) => Err("sender dropped".into()),
            }
        })
    }
}
