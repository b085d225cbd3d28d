use tokio_test::{assert_ready_err, assert_ready_ok};
use tower_test::{assert_request_eq, mock};

use super::*;
use crate::limit::ConcurrencyLimitLayer;
use crate::test_support::{End, Tracked};
use tower::Layer;

#[tokio::test]
async fn ready_inner_is_called() {
    let (mut svc, mut handle) = mock::spawn_layer::<&str, &str, _>(LoadShedLayer::new());
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let fut = svc.call("hello");
    assert_request_eq!(handle, "hello").send_response("world");
    assert_eq!(fut.await.unwrap(), "world");
}

#[tokio::test]
async fn not_ready_inner_is_shed_at_once_without_being_called() {
    let (mut svc, mut handle) = mock::spawn_layer::<&str, &str, _>(LoadShedLayer::new());
    handle.allow(0);
    assert_ready_ok!(svc.poll_ready());
    let err = svc.call("hello").await.unwrap_err();
    assert!(err.is::<Overloaded>(), "{err}");
    handle.allow(1);
    assert!(
        handle.poll_request().is_pending(),
        "the inner service saw nothing"
    );
}

#[tokio::test]
async fn inner_readiness_error_is_passed_on() {
    let (mut svc, mut handle) = mock::spawn_layer::<&str, &str, _>(LoadShedLayer::new());
    handle.send_error("broken");
    let err = assert_ready_err!(svc.poll_ready());
    assert_eq!(err.to_string(), "broken");
}

#[tokio::test]
async fn sheds_exactly_while_the_limit_is_full() {
    let limit = ConcurrencyLimitLayer::new(2);
    let handle = limit.handle();
    let inner = Tracked::default();
    let books = inner.books.clone();
    let svc = LoadShedLayer::new().layer(limit.layer(inner));
    let mut calls = Vec::new();
    let mut shed = 0;
    for id in 0..5 {
        let mut svc = mock::Spawn::new(svc.clone());
        assert_ready_ok!(svc.poll_ready());
        calls.push(tokio::spawn(svc.call(id)));
    }
    tokio::task::yield_now().await;
    for call in calls.drain(..2) {
        assert!(
            !call.is_finished(),
            "the two admitted calls are still running"
        );
    }
    for call in calls {
        let err = call.await.unwrap().unwrap_err();
        assert!(err.is::<Overloaded>());
        shed += 1;
    }
    assert_eq!(shed, 3);
    assert_eq!(books.calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(handle.in_flight(), 2);
    for id in books.running() {
        books.finish(id, End::Ok);
    }
}

#[test]
fn services_fit_axum() {
    fn assert_fits<T: Clone + Send + Sync + 'static>() {}
    assert_fits::<LoadShedLayer>();
    assert_fits::<LoadShed<Tracked>>();
}
