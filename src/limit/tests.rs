use std::future::Future;
use std::pin::Pin;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_test::{assert_pending, assert_ready_ok, task};
use tower::Layer;
use tower_test::{assert_request_eq, mock};

use super::*;
use crate::test_support::{End, Tracked};

type Fut = Pin<Box<dyn Future<Output = Result<u64, crate::BoxError>> + Send>>;

#[tokio::test]
async fn services_made_by_one_layer_share_one_limit() {
    let layer = ConcurrencyLimitLayer::new(2);
    let handle = layer.handle();
    let (a, mut a_handle) = mock::pair::<&str, &str>();
    let (b, mut b_handle) = mock::pair::<&str, &str>();
    a_handle.allow(10);
    b_handle.allow(10);
    let mut svc_a = mock::Spawn::new(layer.layer(a));
    let mut svc_b = mock::Spawn::new(layer.layer(b));

    assert_ready_ok!(svc_a.poll_ready());
    let fa = svc_a.call("a");
    assert_ready_ok!(svc_b.poll_ready());
    let fb = svc_b.call("b");
    assert_eq!(handle.in_flight(), 2);

    // A clone shares the limit: no third permit.
    let mut svc_c = mock::Spawn::new(svc_a.get_ref().clone());
    assert_pending!(svc_c.poll_ready());
    assert_eq!(handle.waiting(), 1);

    assert_request_eq!(a_handle, "a").send_response("A");
    assert_eq!(fa.await.unwrap(), "A");
    assert!(svc_c.is_woken());
    assert_ready_ok!(svc_c.poll_ready());
    assert_eq!((handle.in_flight(), handle.waiting()), (2, 0));

    // A reserved permit goes back when the service is dropped unused.
    drop(svc_c);
    assert_eq!(handle.in_flight(), 1);
    assert_request_eq!(b_handle, "b").send_response("B");
    assert_eq!(fb.await.unwrap(), "B");
    assert_eq!(handle.in_flight(), 0);
}

#[tokio::test]
async fn error_type_stays_the_inner_services() {
    let (mut svc, mut handle) = mock::spawn_layer::<&str, &str, _>(ConcurrencyLimitLayer::new(1));
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let fut = svc.call("x");
    assert_request_eq!(handle, "x").send_error("boom");
    // tower-test's error type is its own BoxError: passed through untouched.
    let err = fut.await.unwrap_err();
    assert_eq!(err.to_string(), "boom");
}

#[tokio::test]
async fn waiters_are_served_first_come_first_served() {
    let layer = ConcurrencyLimitLayer::new(1);
    let handle = layer.handle();
    let inner = Tracked::default();
    let books = inner.books.clone();
    let mut holder = mock::Spawn::new(layer.layer(inner.clone()));
    let mut first = mock::Spawn::new(layer.layer(inner.clone()));
    let mut second = mock::Spawn::new(layer.layer(inner.clone()));
    let mut late = mock::Spawn::new(layer.layer(inner));

    assert_ready_ok!(holder.poll_ready());
    let held = holder.call(0);
    assert_pending!(first.poll_ready());
    assert_pending!(second.poll_ready());

    books.finish(0, End::Ok);
    held.await.unwrap();
    // Only the first waiter is woken, and a newcomer does not overtake it.
    assert!(first.is_woken());
    assert!(!second.is_woken());
    assert_pending!(late.poll_ready());
    assert_pending!(second.poll_ready());
    assert_ready_ok!(first.poll_ready());
    assert_eq!(handle.waiting(), 2);

    // The first waiter leaves without calling: its turn passes on.
    drop(first);
    assert!(second.is_woken());
    assert_ready_ok!(second.poll_ready());
    assert_pending!(late.poll_ready());
}

#[tokio::test]
async fn dropped_waiter_passes_its_wakeup_on() {
    let layer = ConcurrencyLimitLayer::new(1);
    let handle = layer.handle();
    let inner = Tracked::default();
    let books = inner.books.clone();
    let mut holder = mock::Spawn::new(layer.layer(inner.clone()));
    let mut first = mock::Spawn::new(layer.layer(inner.clone()));
    let mut second = mock::Spawn::new(layer.layer(inner));

    assert_ready_ok!(holder.poll_ready());
    let held = holder.call(0);
    assert_pending!(first.poll_ready());
    assert_pending!(second.poll_ready());
    books.finish(0, End::Ok);
    held.await.unwrap();
    // `first` was woken but goes away before it polls again.
    drop(first);
    assert!(second.is_woken());
    assert_ready_ok!(second.poll_ready());
    assert_eq!((handle.in_flight(), handle.waiting()), (1, 0));
}

#[tokio::test]
async fn raising_the_limit_wakes_waiters_and_lowering_revokes_nothing() {
    let layer = ConcurrencyLimitLayer::new(1);
    let handle = layer.handle();
    let inner = Tracked::default();
    let mut a = mock::Spawn::new(layer.layer(inner.clone()));
    let mut b = mock::Spawn::new(layer.layer(inner.clone()));
    let mut c = mock::Spawn::new(layer.layer(inner));
    assert_ready_ok!(a.poll_ready());
    assert_pending!(b.poll_ready());
    assert_pending!(c.poll_ready());

    handle.limiter.set_limit(3);
    assert!(b.is_woken());
    assert_ready_ok!(b.poll_ready());
    // b took its permit and, with room left, woke the next waiter.
    assert!(c.is_woken());
    assert_ready_ok!(c.poll_ready());
    assert_eq!(handle.in_flight(), 3);

    handle.limiter.set_limit(1);
    assert_eq!(handle.in_flight(), 3);
    assert_eq!(handle.available(), 0);
    drop((a, b));
    assert_eq!(handle.in_flight(), 1);
    let mut d = mock::Spawn::new(c.get_ref().clone());
    assert_pending!(d.poll_ready());
}

#[tokio::test]
async fn permit_is_released_on_completion_error_panic_and_drop() {
    let layer = ConcurrencyLimitLayer::new(4);
    let handle = layer.handle();
    let inner = Tracked::default();
    let books = inner.books.clone();
    let mut svc = mock::Spawn::new(layer.layer(inner));
    let mut calls = Vec::new();
    for id in 0..4 {
        assert_ready_ok!(svc.poll_ready());
        calls.push(svc.call(id));
    }
    assert_eq!(handle.in_flight(), 4);
    let mut calls = calls.into_iter();

    let ok = tokio::spawn(calls.next().unwrap());
    let err = tokio::spawn(calls.next().unwrap());
    let panics = tokio::spawn(calls.next().unwrap());
    let dropped = calls.next().unwrap();
    tokio::task::yield_now().await;

    books.finish(0, End::Ok);
    assert_eq!(ok.await.unwrap().unwrap(), 0);
    assert_eq!(handle.in_flight(), 3);
    books.finish(1, End::Err);
    assert!(err.await.unwrap().is_err());
    assert_eq!(handle.in_flight(), 2);
    books.finish(2, End::Panic);
    assert!(panics.await.unwrap_err().is_panic());
    assert_eq!(handle.in_flight(), 1);
    drop(dropped);
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(books.active(), 0);
}

#[test]
fn zero_limit_is_refused_naming_the_field() {
    let err = ConcurrencyLimitLayer::try_new(0).unwrap_err();
    assert_eq!(err.field(), "limit");
    let panic = std::panic::catch_unwind(|| ConcurrencyLimitLayer::new(0)).unwrap_err();
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(message.contains("`limit`"), "{message}");
}

#[test]
fn services_and_futures_fit_axum() {
    fn assert_fits<T: Clone + Send + Sync + 'static>() {}
    fn assert_send<T: Send + 'static>() {}
    assert_fits::<ConcurrencyLimitLayer>();
    assert_fits::<ConcurrencyLimit<Tracked>>();
    assert_send::<future::ResponseFuture<Fut, OnResponse>>();
}

/// 10 000 random steps of new calls, completions, errors, panics and drops, of
/// both calls and waiting services, over four services from one layer: the
/// limit is never exceeded and everything returns to zero.
///
/// A plain test, not a tokio one: polling by hand inside a runtime task would
/// run into tokio's cooperative budget on the oneshot channels.
#[test]
fn limit_is_never_exceeded_across_ten_thousand_random_steps() {
    const LIMIT: usize = 3;
    let mut rng = StdRng::seed_from_u64(0x5ca1e);
    let layer = ConcurrencyLimitLayer::new(LIMIT);
    let handle = layer.handle();
    let inner = Tracked::default();
    let books = inner.books.clone();
    let base = layer.layer(inner);

    let mut waiting: Vec<(u64, mock::Spawn<ConcurrencyLimit<Tracked>>)> = Vec::new();
    let mut calls: Vec<(u64, task::Spawn<Fut>)> = Vec::new();
    let mut next_id = 0u64;
    let mut answered = 0usize;
    let mut reached_limit = false;
    let mut abandoned = None;

    for _ in 0..10_000 {
        match rng.random_range(0..10) {
            0..=2 => {
                let mut svc = mock::Spawn::new(base.clone());
                if svc.poll_ready().is_ready() {
                    calls.push((next_id, task::spawn(Box::pin(svc.call(next_id)))));
                } else {
                    waiting.push((next_id, svc));
                }
                next_id += 1;
            }
            3..=6 => {
                let running = books.running();
                if !running.is_empty() {
                    let id = running[rng.random_range(0..running.len())];
                    let end = if rng.random_bool(0.8) {
                        End::Ok
                    } else {
                        End::Err
                    };
                    books.finish(id, end);
                }
            }
            7 if !calls.is_empty() => {
                let (_, call) = calls.swap_remove(rng.random_range(0..calls.len()));
                drop(call);
            }
            8 if !waiting.is_empty() => {
                let (_, svc) = waiting.swap_remove(rng.random_range(0..waiting.len()));
                drop(svc);
            }
            // A caller gives up on a waiting service but keeps it, unpolled (a
            // timeout around `ready()`); at most one such at a time, dropped
            // when the next one comes.
            9 if !waiting.is_empty() => {
                let (_, svc) = waiting.swap_remove(rng.random_range(0..waiting.len()));
                abandoned = Some(svc);
            }
            _ => {}
        }
        // Only woken waiters are polled: a lost wake-up leaves a waiter behind.
        let mut i = 0;
        while i < waiting.len() {
            if waiting[i].1.is_woken() && waiting[i].1.poll_ready().is_ready() {
                let (id, mut svc) = waiting.swap_remove(i);
                calls.push((id, task::spawn(Box::pin(svc.call(id)))));
            } else {
                i += 1;
            }
        }
        calls.retain_mut(|(_, call)| match call.poll() {
            std::task::Poll::Ready(_) => {
                answered += 1;
                false
            }
            std::task::Poll::Pending => true,
        });
        assert!(
            handle.in_flight() <= LIMIT,
            "in flight {}",
            handle.in_flight()
        );
        assert!(books.active() <= LIMIT, "inner active {}", books.active());
        // Work-conserving: whoever waits, waits because the limit is full.
        assert!(
            waiting.is_empty() || handle.in_flight() == LIMIT,
            "{} waiting with {} in flight",
            waiting.len(),
            handle.in_flight()
        );
        reached_limit |= handle.in_flight() == LIMIT;
    }
    assert!(reached_limit);
    assert!(answered > 1_000, "only {answered} answered");
    assert_eq!(books.max_active(), LIMIT);

    drop((waiting, abandoned));
    for id in books.running() {
        books.finish(id, End::Ok);
    }
    for (_, mut call) in calls {
        assert!(call.poll().is_ready());
    }
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(handle.waiting(), 0);
    assert_eq!(books.active(), 0);
}
