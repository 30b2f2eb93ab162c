use super::{Endpoints, HttpAdmission};
use crate::local::LocalCapacity;
use crate::source::CapacitySource;
use portcullis_core::HealthSource;
use std::fmt;
use std::sync::Arc;
use tower_layer::Layer;

/// Applies [`HttpAdmission`] with a set of watched [`Endpoints`] and an optional health
/// gate.
///
/// ```
/// use portcullis_admission::{Config, HttpAdmissionLayer};
///
/// let config: Config = serde_json::from_value(serde_json::json!({
///     "queue_timeout": 5,
///     "endpoints": {"/work": {"method": "POST", "capacity": 8}, "/probe-me": {}}
/// })).unwrap();
/// let layer = HttpAdmissionLayer::from_config(&config, 4).unwrap();
/// let stats = layer.endpoints().stats();
/// assert_eq!(stats.endpoints["/work"].capacity, 8);
/// assert_eq!(stats.endpoints["/probe-me"].capacity, 4); // default until probed
/// assert!(layer.endpoints().set_capacity("/probe-me", 12));
/// assert_eq!(layer.endpoints().stats().endpoints["/probe-me"].available_slots, 12);
/// ```
pub struct HttpAdmissionLayer<C = LocalCapacity> {
    endpoints: Endpoints<C>,
    health: Option<Arc<dyn HealthSource>>,
    hold: bool,
    honor_request_timeout: bool,
}

impl HttpAdmissionLayer<LocalCapacity> {
    /// In-process limiters for the endpoints of `config`; see
    /// [`Endpoints::from_config`].
    pub fn from_config(config: &crate::Config, default_capacity: usize) -> Result<Self, String> {
        Ok(Self::new(Endpoints::from_config(config, default_capacity)?)
            .honor_request_timeout(config.honor_request_timeout))
    }
}

impl<C: CapacitySource> HttpAdmissionLayer<C> {
    /// A layer watching `endpoints`, without a health gate.
    pub fn new(endpoints: Endpoints<C>) -> Self {
        Self {
            endpoints,
            health: None,
            hold: false,
            honor_request_timeout: false,
        }
    }

    /// With `true`, a queued request's wait also ends at the deadline its
    /// `x-request-timeout` header gives (seconds, a float), and the header is rewritten to
    /// the time left when it is admitted. Off by default. `grpc-timeout` is always honoured.
    /// See [`deadline`](crate::deadline).
    pub fn honor_request_timeout(mut self, honor: bool) -> Self {
        self.honor_request_timeout = honor;
        self
    }

    /// With `true`, every admitted watched request shares its slot with a
    /// [`HoldOnCancel`](crate::HoldOnCancel) placed directly below this layer, so a request
    /// whose client goes away keeps its slot until its upstream request has ended
    /// ([`OnClientCancel::Hold`](crate::OnClientCancel::Hold)). Without a `HoldOnCancel`
    /// below, the share is dropped with the request and the slot is released as with
    /// `false` (the default: [`OnClientCancel::Release`](crate::OnClientCancel::Release)).
    pub fn hold_on_client_cancel(mut self, hold: bool) -> Self {
        self.hold = hold;
        self
    }

    /// Refuses watched requests with 503 `backend_unhealthy` (and `Retry-After`) before
    /// queueing while `health` says nothing can serve. Unwatched paths are not gated.
    pub fn with_health(mut self, health: impl HealthSource) -> Self {
        self.health = Some(Arc::new(health));
        self
    }

    /// Like [`with_health`](Self::with_health), with an already shared source.
    pub fn with_shared_health(mut self, health: Arc<dyn HealthSource>) -> Self {
        self.health = Some(health);
        self
    }

    /// The watched endpoints: stats and runtime capacity changes.
    pub fn endpoints(&self) -> &Endpoints<C> {
        &self.endpoints
    }
}

impl<C> Clone for HttpAdmissionLayer<C> {
    fn clone(&self) -> Self {
        Self {
            endpoints: self.endpoints.clone(),
            health: self.health.clone(),
            hold: self.hold,
            honor_request_timeout: self.honor_request_timeout,
        }
    }
}

impl<C: CapacitySource + fmt::Debug> fmt::Debug for HttpAdmissionLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpAdmissionLayer")
            .field("endpoints", &self.endpoints)
            .field("health_gate", &self.health.is_some())
            .field("hold_on_client_cancel", &self.hold)
            .finish()
    }
}

impl<S, C: CapacitySource> Layer<S> for HttpAdmissionLayer<C> {
    type Service = HttpAdmission<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpAdmission::from_parts(
            inner,
            self.endpoints.clone(),
            self.health.clone(),
            self.hold,
        )
        .with_request_timeout(self.honor_request_timeout)
    }
}
