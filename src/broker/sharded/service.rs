//! One service object per shard, after seastar's `sharded<T>`: a layer above the broker
//! (the server, the API) keeps its per-shard state in a typed slot of each [`Shard`]
//! rather than in thread-locals, starts it shard by shard, calls into it on one shard or
//! all, and stops it with an awaitable stop. A service still installed when its shard
//! stops is dropped there.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::rc::Rc;

use super::{Shard, ShardId, ShardedSending};
use crate::broker::BrokerError;

/// A per-shard service: lives on its shard, in the shard's slot for its type.
pub trait ShardService: 'static {
    /// Ends the service on its shard; [`Sharded::stop`] awaits it on every shard, after
    /// taking the service out of its slot.
    fn stop(self: Rc<Self>) -> Pin<Box<dyn Future<Output = ()>>>;
}

/// The handle to a service of type `T` on every shard. `Send + Sync` (it holds only the
/// broker's sending facet): any thread may start, call and stop the services.
pub struct Sharded<T> {
    sending: ShardedSending,
    /// The handle names `T` but holds none: each lives on its shard.
    _service: PhantomData<fn() -> T>,
}

impl<T> Clone for Sharded<T> {
    fn clone(&self) -> Self {
        Self {
            sending: self.sending.clone(),
            _service: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for Sharded<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sharded")
            .field("service", &std::any::type_name::<T>())
            .field("nr_shards", &self.sending.nr_shards())
            .finish()
    }
}

impl<T: ShardService> Sharded<T> {
    /// A handle for `T` on the shards `sending` reaches; nothing is started yet.
    pub fn new(sending: ShardedSending) -> Self {
        Self {
            sending,
            _service: PhantomData,
        }
    }

    /// How many shards there are.
    pub fn nr_shards(&self) -> usize {
        self.sending.nr_shards()
    }

    /// Makes the service on `shard` (on that shard's thread) and installs it there;
    /// what `make` returns besides the service comes back. A service of the same type
    /// already there is stopped (in a task of its own) and replaced.
    ///
    /// # Errors
    /// What `make` returned (nothing is installed then), or [`BrokerError::NotRunning`].
    pub async fn start_on<R, E>(
        &self,
        shard: ShardId,
        make: impl FnOnce(&Shard) -> Result<(T, R), E> + Send + 'static,
    ) -> Result<Result<R, E>, BrokerError>
    where
        R: Send + 'static,
        E: Send + 'static,
    {
        self.sending
            .run_on(shard, move |s| {
                let (service, out) = make(s)?;
                if let Some(old) = s.install_service(Rc::new(service)) {
                    glommio::spawn_local(old.stop()).detach();
                }
                Ok(out)
            })
            .await
    }

    /// Runs `f` with the service on `shard`, on that shard, and returns what it returns;
    /// `None` when the shard has no such service (not started, or stopped).
    ///
    /// # Errors
    /// [`BrokerError::NotRunning`] when the broker is stopped.
    pub async fn invoke_on<R: Send + 'static>(
        &self,
        shard: ShardId,
        f: impl FnOnce(&Rc<T>) -> R + Send + 'static,
    ) -> Result<Option<R>, BrokerError> {
        self.sending
            .run_on(shard, move |s| s.service::<T>().map(|service| f(&service)))
            .await
    }

    /// Runs the future `f` makes with the service on every shard, as a task there, all
    /// shards at once, and returns each shard's output in shard order (`None` for a
    /// shard without the service or not answering).
    pub async fn invoke_on_all<R, F, Fut>(&self, f: F) -> Vec<Option<R>>
    where
        R: Send + 'static,
        F: Fn(Rc<T>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = R> + 'static,
    {
        let calls = (0..self.nr_shards()).map(|i| {
            let f = f.clone();
            self.sending
                .run_task_on(ShardId(i), move |s: Shard| async move {
                    match s.service::<T>() {
                        Some(service) => Some(f(service).await),
                        None => None,
                    }
                })
        });
        join_all(calls)
            .await
            .into_iter()
            .map(|answer| answer.ok().flatten())
            .collect()
    }

    /// Stops the service on every shard: takes it out of its slot and awaits its
    /// [`ShardService::stop`], all shards at once.
    pub async fn stop(&self) {
        let stops = (0..self.nr_shards()).map(|i| {
            self.sending.run_task_on(ShardId(i), |s: Shard| async move {
                if let Some(service) = s.remove_service::<T>() {
                    service.stop().await;
                }
            })
        });
        join_all(stops).await;
    }
}

/// Polls every future of `futures` together until all are done; their outputs in order.
async fn join_all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut done: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(move |cx| {
        let mut all = true;
        for (fut, out) in pending.iter_mut().zip(done.iter_mut()) {
            if out.is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *out = Some(v),
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(done.iter_mut().filter_map(Option::take).collect())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}
