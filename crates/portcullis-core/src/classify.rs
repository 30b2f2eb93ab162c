//! Which responses count as failures, for gRPC and for mixed HTTP + gRPC traffic, built on
//! tower-http's [`classify`](tower_http::classify).
//!
//! A gRPC call that fails is usually still an HTTP `200`: its outcome is the `grpc-status`
//! metadata, either in the response headers (a *trailers-only* response, as tonic sends for a
//! call refused before any message) or in the trailers after the last message. A "5xx is a
//! failure" classifier therefore never sees a gRPC failure, and a gRPC backend that fails
//! every call is never ejected and never trips a breaker.
//!
//! * [`GrpcFailures`] is tower-http's [`GrpcErrorsAsFailures`] with a configurable set of
//!   failure codes ([`GrpcCodeSet`]): it reads `grpc-status` from the headers and, when they
//!   have none, asks for the end of the stream ([`ClassifiedResponse::RequiresEos`]) and reads
//!   the trailers there ([`GrpcFailuresEos`], the same rules as tower-http's
//!   [`GrpcEosErrorsAsFailures`](tower_http::classify::GrpcEosErrorsAsFailures)). A response without any `grpc-status` whose HTTP status is not 2xx
//!   (an HTTP proxy between client and server answered) is classified by the code the gRPC
//!   HTTP mapping gives it ([`grpc_status_for`]).
//! * [`ProtocolClassifier`] is a [`MakeClassifier`] that picks per request: [`GrpcFailures`]
//!   for `content-type: application/grpc*`, tower-http's [`ServerErrorsAsFailures`] otherwise.
//!
//! # The default failure codes
//!
//! `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `INTERNAL`, `UNKNOWN` and `DATA_LOSS`
//! ([`GrpcCodeSet::DEFAULT_FAILURES`]): the codes that say the *server* could not do its
//! job. The other codes describe the call, not the replica: `INVALID_ARGUMENT`,
//! `NOT_FOUND`, `ALREADY_EXISTS`, `FAILED_PRECONDITION`, `OUT_OF_RANGE`, `UNIMPLEMENTED` and
//! `UNAUTHENTICATED` would be answered the same by every healthy replica, `CANCELLED` is the
//! client going away, and `RESOURCE_EXHAUSTED` is usually a quota of the caller.
//!
//! `PERMISSION_DENIED` is **not** counted (linkerd counts it). It is an authorization
//! decision about the caller, and every correctly configured replica gives the same answer:
//! counting it would let one client without the right credentials eject healthy replicas and
//! trip the breaker for everybody else. A deployment where `PERMISSION_DENIED` does mean a
//! broken replica (a replica whose policy failed to load) can add it to the set.
//!
//! ```
//! use portcullis_core::classify::{GrpcCodeSet, GrpcFailures};
//! use tower_http::classify::{ClassifiedResponse, ClassifyResponse};
//!
//! let unavailable = http::Response::builder()
//!     .header("content-type", "application/grpc")
//!     .header("grpc-status", "14")
//!     .body(())
//!     .unwrap();
//! let c = GrpcFailures::new(GrpcCodeSet::DEFAULT_FAILURES);
//! assert!(matches!(c.clone().classify_response(&unavailable), ClassifiedResponse::Ready(Err(_))));
//!
//! // PERMISSION_DENIED (7) is not a failure by default.
//! let denied = http::Response::builder().header("grpc-status", "7").body(()).unwrap();
//! assert!(matches!(c.classify_response(&denied), ClassifiedResponse::Ready(Ok(()))));
//! ```

use crate::grpc::{grpc_status_for, is_grpc_request};
use http::{HeaderMap, HeaderName, Request, Response};
use serde::de::{self, Deserializer};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::num::NonZeroI32;
use tower_http::classify::{
    ClassifiedResponse, ClassifyEos, ClassifyResponse, GrpcCode, GrpcErrorsAsFailures,
    GrpcFailureClass, MakeClassifier, NeverClassifyEos, ServerErrorsAsFailures,
    ServerErrorsFailureClass,
};

/// The names of the gRPC status codes, indexed by code (`google.rpc.Code`).
const NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// A set of gRPC status codes: the ones a classifier counts as failures.
///
/// In config it is a list of code names, in `SCREAMING_SNAKE_CASE` (`UNAVAILABLE`, as in
/// `google.rpc.Code`) or `snake_case` (`unavailable`); it serializes in the former. `OK`
/// cannot be a failure.
///
/// ```
/// use portcullis_core::classify::GrpcCodeSet;
///
/// let set: GrpcCodeSet = serde_json::from_str(r#"["UNAVAILABLE", "permission_denied"]"#).unwrap();
/// assert!(set.contains(14) && set.contains(7) && !set.contains(13));
/// assert_eq!(serde_json::to_string(&set).unwrap(), r#"["PERMISSION_DENIED","UNAVAILABLE"]"#);
/// assert!(serde_json::from_str::<GrpcCodeSet>(r#"["OK"]"#).is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct GrpcCodeSet(u32);

impl GrpcCodeSet {
    /// No code: only transport errors count.
    pub const EMPTY: Self = Self(0);

    /// `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `INTERNAL`, `UNKNOWN`, `DATA_LOSS` (see the
    /// [module docs](self) for why `PERMISSION_DENIED` is not among them).
    pub const DEFAULT_FAILURES: Self = Self::EMPTY.with(14).with(4).with(13).with(2).with(15);

    /// This set plus `code` (1..=16; other values are ignored, `OK` cannot be a failure).
    pub const fn with(self, code: i32) -> Self {
        if code >= 1 && code <= 16 {
            Self(self.0 | 1 << code)
        } else {
            self
        }
    }

    /// `true` when `code` is in the set.
    pub const fn contains(self, code: i32) -> bool {
        code >= 1 && code <= 16 && self.0 & (1 << code) != 0
    }

    /// The codes in the set, ascending.
    pub fn codes(self) -> impl Iterator<Item = i32> {
        (1..=16).filter(move |&c| self.contains(c))
    }

    /// The code named `name` (`UNAVAILABLE` or `unavailable`), `OK` included.
    pub fn code_of(name: &str) -> Option<i32> {
        NAMES
            .iter()
            .position(|n| n.eq_ignore_ascii_case(name))
            .and_then(|i| i32::try_from(i).ok())
    }

    /// The `SCREAMING_SNAKE_CASE` name of `code` (`None` outside 0..=16).
    pub fn name_of(code: i32) -> Option<&'static str> {
        usize::try_from(code)
            .ok()
            .and_then(|i| NAMES.get(i).copied())
    }
}

impl Default for GrpcCodeSet {
    fn default() -> Self {
        Self::DEFAULT_FAILURES
    }
}

impl fmt::Debug for GrpcCodeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.codes().filter_map(Self::name_of))
            .finish()
    }
}

impl FromIterator<i32> for GrpcCodeSet {
    fn from_iter<I: IntoIterator<Item = i32>>(iter: I) -> Self {
        iter.into_iter().fold(Self::EMPTY, Self::with)
    }
}

impl Serialize for GrpcCodeSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(None)?;
        for name in self.codes().filter_map(Self::name_of) {
            seq.serialize_element(name)?;
        }
        seq.end()
    }
}

/// One failure-code name in a config list.
struct FailureCodeName(i32);

impl<'de> Deserialize<'de> for FailureCodeName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        match GrpcCodeSet::code_of(&name) {
            Some(0) => Err(de::Error::custom("OK cannot be a failure code")),
            Some(code) => Ok(Self(code)),
            None => Err(de::Error::custom(format!(
                "`{name}` is not a gRPC status code name (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, ...)"
            ))),
        }
    }
}

impl<'de> Deserialize<'de> for GrpcCodeSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<FailureCodeName>::deserialize(d)?;
        Ok(names.into_iter().map(|n| n.0).collect())
    }
}

/// tower-http's [`GrpcErrorsAsFailures`] with a configurable set of failure codes.
///
/// The `grpc-status` of the response headers (a trailers-only response) decides at once,
/// read by tower-http's [`GrpcErrorsAsFailures`]. Without one the classifier waits for the
/// trailers ([`ClassifiedResponse::RequiresEos`] with a [`GrpcFailuresEos`]), so the
/// response body must be watched to its end. A response with no `grpc-status` in its headers
/// and a non-2xx HTTP status is classified by the gRPC code of that status (502, 503 →
/// `UNAVAILABLE`; 504 → `DEADLINE_EXCEEDED`; 500 → `INTERNAL`). A status that is not a
/// number is not a failure (as in tower-http); a number outside 0..=16 is one.
#[derive(Clone)]
pub struct GrpcFailures {
    failures: GrpcCodeSet,
    inner: GrpcErrorsAsFailures,
}

impl GrpcFailures {
    /// Counts the codes of `failures` (and transport errors) as failures.
    pub fn new(failures: GrpcCodeSet) -> Self {
        let inner = (1..=16)
            .filter(|&c| !failures.contains(c))
            .fold(GrpcErrorsAsFailures::new(), |c, code| {
                c.with_success(GrpcCode::from(code))
            });
        Self { failures, inner }
    }

    /// The failure codes.
    pub fn failure_codes(&self) -> GrpcCodeSet {
        self.failures
    }
}

impl Default for GrpcFailures {
    fn default() -> Self {
        Self::new(GrpcCodeSet::DEFAULT_FAILURES)
    }
}

impl fmt::Debug for GrpcFailures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcFailures")
            .field("failures", &self.failures)
            .finish()
    }
}

impl ClassifyResponse for GrpcFailures {
    type FailureClass = GrpcFailureClass;
    type ClassifyEos = GrpcFailuresEos;

    #[inline]
    fn classify_response<B>(
        self,
        res: &Response<B>,
    ) -> ClassifiedResponse<Self::FailureClass, Self::ClassifyEos> {
        let eos = GrpcFailuresEos {
            failures: self.failures,
        };
        if res.headers().contains_key(GRPC_STATUS) {
            return match self.inner.classify_response(res) {
                ClassifiedResponse::Ready(r) => ClassifiedResponse::Ready(r),
                ClassifiedResponse::RequiresEos(_) => ClassifiedResponse::RequiresEos(eos),
            };
        }
        // An HTTP error with no grpc-status: an HTTP hop answered instead of the server.
        if !res.status().is_success() {
            let code = grpc_status_for(res.status()).as_i32();
            return ClassifiedResponse::Ready(match NonZeroI32::new(code) {
                Some(code) if self.failures.contains(code.get()) => {
                    Err(GrpcFailureClass::Code(code))
                }
                _ => Ok(()),
            });
        }
        // The common case: a 200 whose status comes in the trailers.
        ClassifiedResponse::RequiresEos(eos)
    }

    fn classify_error<E>(self, error: &E) -> Self::FailureClass
    where
        E: fmt::Display + 'static,
    {
        self.inner.classify_error(error)
    }
}

/// The end-of-stream half of [`GrpcFailures`]: the `grpc-status` of the trailers.
///
/// The same rules as tower-http's `GrpcEosErrorsAsFailures` (no trailers or no
/// `grpc-status`: not a failure; not a number: not a failure; a failure code or a number
/// outside 0..=16: a failure), with the header name parsed once rather than on every
/// lookup: this runs at the end of every gRPC response.
#[derive(Debug, Clone, Copy)]
pub struct GrpcFailuresEos {
    failures: GrpcCodeSet,
}

impl ClassifyEos for GrpcFailuresEos {
    type FailureClass = GrpcFailureClass;

    #[inline]
    fn classify_eos(self, trailers: Option<&HeaderMap>) -> Result<(), Self::FailureClass> {
        let Some(value) = trailers.and_then(|t| t.get(GRPC_STATUS)) else {
            return Ok(());
        };
        let code = value.to_str().ok().and_then(|s| s.parse::<i32>().ok());
        match code.and_then(NonZeroI32::new) {
            Some(code) if self.failures.contains(code.get()) || !(1..=16).contains(&code.get()) => {
                Err(GrpcFailureClass::Code(code))
            }
            _ => Ok(()),
        }
    }

    fn classify_error<E>(self, error: &E) -> Self::FailureClass
    where
        E: fmt::Display + 'static,
    {
        GrpcFailureClass::Error(error.to_string())
    }
}

impl MakeClassifier for GrpcFailures {
    type FailureClass = GrpcFailureClass;
    type ClassifyEos = GrpcFailuresEos;
    type Classifier = Self;

    fn make_classifier<B>(&self, _req: &Request<B>) -> Self::Classifier {
        self.clone()
    }
}

/// Picks the classifier per request: [`GrpcFailures`] for `content-type: application/grpc*`,
/// tower-http's [`ServerErrorsAsFailures`] (5xx and errors) for everything else.
#[derive(Debug, Clone, Default)]
pub struct ProtocolClassifier {
    grpc: GrpcFailures,
}

impl ProtocolClassifier {
    /// gRPC requests count the codes of `grpc_failures`; other requests count 5xx.
    pub fn new(grpc_failures: GrpcCodeSet) -> Self {
        Self {
            grpc: GrpcFailures::new(grpc_failures),
        }
    }

    /// The gRPC failure codes.
    pub fn grpc_failure_codes(&self) -> GrpcCodeSet {
        self.grpc.failure_codes()
    }
}

/// The classifier [`ProtocolClassifier`] picked for one request.
#[derive(Debug, Clone)]
pub enum ProtocolClassify {
    /// A plain HTTP request: 5xx and errors are failures.
    Http(ServerErrorsAsFailures),
    /// A gRPC request: the failure codes of `grpc-status`, and errors.
    Grpc(GrpcFailures),
}

/// The end-of-stream half of [`ProtocolClassify`] (only gRPC needs one).
#[derive(Debug)]
pub enum ProtocolEos {
    /// Never built: plain HTTP is decided on the response headers.
    Http(NeverClassifyEos<ServerErrorsFailureClass>),
    /// The gRPC trailers decide.
    Grpc(GrpcFailuresEos),
}

/// Why [`ProtocolClassify`] called a response a failure.
#[derive(Debug)]
pub enum ProtocolFailure {
    /// A plain HTTP failure (a 5xx or an error).
    Http(ServerErrorsFailureClass),
    /// A gRPC failure (a failure code or an error).
    Grpc(GrpcFailureClass),
}

impl fmt::Display for ProtocolFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Http(c) => c.fmt(f),
            Self::Grpc(c) => c.fmt(f),
        }
    }
}

impl MakeClassifier for ProtocolClassifier {
    type FailureClass = ProtocolFailure;
    type ClassifyEos = ProtocolEos;
    type Classifier = ProtocolClassify;

    #[inline]
    fn make_classifier<B>(&self, req: &Request<B>) -> Self::Classifier {
        if is_grpc_request(req.headers()) {
            ProtocolClassify::Grpc(self.grpc.clone())
        } else {
            ProtocolClassify::Http(ServerErrorsAsFailures::new())
        }
    }
}

impl ClassifyResponse for ProtocolClassify {
    type FailureClass = ProtocolFailure;
    type ClassifyEos = ProtocolEos;

    #[inline]
    fn classify_response<B>(
        self,
        res: &Response<B>,
    ) -> ClassifiedResponse<Self::FailureClass, Self::ClassifyEos> {
        match self {
            Self::Http(c) => match c.classify_response(res) {
                ClassifiedResponse::Ready(r) => {
                    ClassifiedResponse::Ready(r.map_err(ProtocolFailure::Http))
                }
                ClassifiedResponse::RequiresEos(eos) => {
                    ClassifiedResponse::RequiresEos(ProtocolEos::Http(eos))
                }
            },
            Self::Grpc(c) => match c.classify_response(res) {
                ClassifiedResponse::Ready(r) => {
                    ClassifiedResponse::Ready(r.map_err(ProtocolFailure::Grpc))
                }
                ClassifiedResponse::RequiresEos(eos) => {
                    ClassifiedResponse::RequiresEos(ProtocolEos::Grpc(eos))
                }
            },
        }
    }

    fn classify_error<E>(self, error: &E) -> Self::FailureClass
    where
        E: fmt::Display + 'static,
    {
        match self {
            Self::Http(c) => ProtocolFailure::Http(c.classify_error(error)),
            Self::Grpc(c) => ProtocolFailure::Grpc(c.classify_error(error)),
        }
    }
}

impl ClassifyEos for ProtocolEos {
    type FailureClass = ProtocolFailure;

    #[inline]
    fn classify_eos(self, trailers: Option<&HeaderMap>) -> Result<(), Self::FailureClass> {
        match self {
            Self::Http(eos) => eos.classify_eos(trailers).map_err(ProtocolFailure::Http),
            Self::Grpc(eos) => eos.classify_eos(trailers).map_err(ProtocolFailure::Grpc),
        }
    }

    fn classify_error<E>(self, error: &E) -> Self::FailureClass
    where
        E: fmt::Display + 'static,
    {
        match self {
            Self::Http(eos) => ProtocolFailure::Http(eos.classify_error(error)),
            Self::Grpc(eos) => ProtocolFailure::Grpc(eos.classify_error(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u16, grpc_status: Option<&str>) -> Response<()> {
        let mut b = Response::builder()
            .status(status)
            .header("content-type", "application/grpc");
        if let Some(s) = grpc_status {
            b = b.header("grpc-status", s);
        }
        b.body(()).unwrap()
    }

    fn trailers(grpc_status: &str) -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", grpc_status.parse().unwrap());
        t
    }

    /// `Some(ok)` when decided on the headers, `None` when the trailers must decide.
    fn on_headers(c: &GrpcFailures, res: &Response<()>) -> Option<bool> {
        match c.clone().classify_response(res) {
            ClassifiedResponse::Ready(r) => Some(r.is_ok()),
            ClassifiedResponse::RequiresEos(_) => None,
        }
    }

    fn on_trailers(c: &GrpcFailures, t: Option<&HeaderMap>) -> bool {
        match c.clone().classify_response(&response(200, None)) {
            ClassifiedResponse::RequiresEos(eos) => eos.classify_eos(t).is_ok(),
            ClassifiedResponse::Ready(_) => panic!("a 200 without grpc-status needs trailers"),
        }
    }

    #[test]
    fn default_codes_are_failures_in_headers_and_trailers() {
        let c = GrpcFailures::default();
        for code in 0..=16 {
            let failure = [14, 4, 13, 2, 15].contains(&code);
            let s = code.to_string();
            assert_eq!(
                on_headers(&c, &response(200, Some(&s))),
                Some(!failure),
                "{code}"
            );
            assert_eq!(on_trailers(&c, Some(&trailers(&s))), !failure, "{code}");
        }
        // Out-of-range codes are failures; non-numeric ones are not.
        assert_eq!(on_headers(&c, &response(200, Some("99"))), Some(false));
        assert_eq!(on_headers(&c, &response(200, Some("nope"))), Some(true));
        // No trailers at all: nothing says it failed.
        assert!(on_trailers(&c, None));
    }

    #[test]
    fn trailers_agree_with_tower_http() {
        for set in [
            GrpcCodeSet::DEFAULT_FAILURES,
            GrpcCodeSet::EMPTY.with(7).with(12),
        ] {
            let ours = GrpcFailures::new(set);
            let theirs = (1..=16)
                .filter(|&c| !set.contains(c))
                .fold(GrpcErrorsAsFailures::new(), |c, code| {
                    c.with_success(GrpcCode::from(code))
                });
            let values = (-2..=20)
                .map(|c: i32| c.to_string())
                .chain(["x".to_owned(), " 14".to_owned()]);
            for v in values {
                let t = trailers(&v);
                let theirs = match theirs.clone().classify_response(&Response::new(())) {
                    ClassifiedResponse::RequiresEos(eos) => eos.classify_eos(Some(&t)).is_ok(),
                    ClassifiedResponse::Ready(_) => unreachable!(),
                };
                assert_eq!(on_trailers(&ours, Some(&t)), theirs, "{v:?} {set:?}");
            }
        }
    }

    #[test]
    fn http_errors_without_grpc_status_follow_the_grpc_mapping() {
        let c = GrpcFailures::default();
        assert_eq!(on_headers(&c, &response(503, None)), Some(false));
        assert_eq!(on_headers(&c, &response(502, None)), Some(false));
        assert_eq!(on_headers(&c, &response(504, None)), Some(false));
        assert_eq!(on_headers(&c, &response(500, None)), Some(false));
        assert_eq!(on_headers(&c, &response(404, None)), Some(true));
        // With a grpc-status the status wins, whatever the HTTP status.
        assert_eq!(on_headers(&c, &response(503, Some("0"))), Some(true));
        let none = GrpcFailures::new(GrpcCodeSet::EMPTY);
        assert_eq!(on_headers(&none, &response(503, None)), Some(true));
    }

    #[test]
    fn the_set_is_configurable() {
        let c = GrpcFailures::new(GrpcCodeSet::DEFAULT_FAILURES.with(7));
        assert_eq!(on_headers(&c, &response(200, Some("7"))), Some(false));
        let c = GrpcFailures::new(GrpcCodeSet::EMPTY.with(5));
        assert_eq!(on_headers(&c, &response(200, Some("14"))), Some(true));
        assert!(!on_trailers(&c, Some(&trailers("5"))));
    }

    #[test]
    fn names_parse_in_both_cases() {
        let set: GrpcCodeSet =
            serde_json::from_str(r#"["DEADLINE_EXCEEDED", "data_loss", "Unavailable"]"#).unwrap();
        assert_eq!(set.codes().collect::<Vec<_>>(), [4, 14, 15]);
        let e = serde_json::from_str::<GrpcCodeSet>(r#"["UNAVAILABLE", "BROKEN"]"#).unwrap_err();
        assert!(e.to_string().contains("`BROKEN`"), "{e}");
        assert!(serde_json::from_str::<GrpcCodeSet>(r#"["ok"]"#).is_err());
        assert_eq!(
            format!("{:?}", GrpcCodeSet::DEFAULT_FAILURES),
            r#"{"UNKNOWN", "DEADLINE_EXCEEDED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}"#
        );
        let empty: GrpcCodeSet = serde_json::from_str("[]").unwrap();
        assert_eq!(empty, GrpcCodeSet::EMPTY);
    }

    #[test]
    fn protocol_classifier_picks_by_content_type() {
        let make = ProtocolClassifier::default();
        let grpc_req = Request::post("/pkg.S/M")
            .header("content-type", "application/grpc+proto")
            .body(())
            .unwrap();
        let http_req = Request::post("/work").body(()).unwrap();
        let failed_grpc = response(200, Some("14"));
        assert!(matches!(
            make.make_classifier(&grpc_req)
                .classify_response(&failed_grpc),
            ClassifiedResponse::Ready(Err(ProtocolFailure::Grpc(_)))
        ));
        assert!(matches!(
            make.make_classifier(&http_req)
                .classify_response(&failed_grpc),
            ClassifiedResponse::Ready(Ok(()))
        ));
        assert!(matches!(
            make.make_classifier(&http_req)
                .classify_response(&response(503, None)),
            ClassifiedResponse::Ready(Err(ProtocolFailure::Http(_)))
        ));
        match make
            .make_classifier(&grpc_req)
            .classify_response(&response(200, None))
        {
            ClassifiedResponse::RequiresEos(eos) => {
                assert!(eos.classify_eos(Some(&trailers("13"))).is_err());
            }
            ClassifiedResponse::Ready(_) => panic!("needs the trailers"),
        }
    }
}
