//! Reads the flat YAML into [`GatewayConfig`] and its flattened sections, each straight from
//! the parser, so that an error keeps its field path and line.
//!
//! `GatewayConfig` composes the crates' configs with `#[serde(flatten)]`. To fill a
//! flattened struct, serde first buffers every value it does not know, and reads the section
//! from the buffer: an error inside it (`failure_threshold: -2`) would lose its path and its
//! line, and a buffered `2` could no longer be read as the string `"2"` (a header value).
//! So the text is read once per part, each time through [`OnlyKeys`], which hands the part
//! only its own top-level keys and skips the others:
//!
//! * each section ([`portcullis_balance::Config`], [`portcullis_admission::Config`],
//!   [`ProbeConfig`]) sees the keys it declares;
//! * `GatewayConfig` itself sees every other key, so its flattened sections stay at their
//!   defaults and a key nobody declares is its `deny_unknown_fields` error.
//!
//! Every value is then parsed by `serde_yaml_ng` itself, which names the field's path and
//! line on an error, as it does for an unflattened struct.

use super::GatewayConfig;
use portcullis_probe::ProbeConfig;
use serde::de::value::Error as ValueError;
use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, IgnoredAny, IntoDeserializer, MapAccess,
    Visitor,
};
use std::cell::Cell;
use std::fmt;

/// Parses `text`: the gateway's own fields, then each flattened section.
pub(super) fn from_yaml(text: &str) -> Result<GatewayConfig, serde_yaml_ng::Error> {
    let sections = [
        fields_of::<portcullis_balance::Config>(),
        fields_of::<portcullis_admission::Config>(),
        fields_of::<ProbeConfig>(),
    ]
    .concat();
    let mut cfg: GatewayConfig = read(text, Keys::Except(&sections))?;
    cfg.balance = read(text, Keys::Declared)?;
    cfg.admission = read(text, Keys::Declared)?;
    cfg.probe = read(text, Keys::Declared)?;
    Ok(cfg)
}

fn read<T: DeserializeOwned>(text: &str, keys: Keys<'_>) -> Result<T, serde_yaml_ng::Error> {
    T::deserialize(OnlyKeys {
        inner: serde_yaml_ng::Deserializer::from_str(text),
        keys,
    })
}

/// The top-level keys a part is handed.
#[derive(Clone, Copy)]
enum Keys<'a> {
    /// The fields the struct declares (a section).
    Declared,
    /// Every key but these (the gateway's own fields, and the unknown ones).
    Except(&'a [&'static str]),
}

/// [`Keys`] for one struct, with the fields it declares.
#[derive(Clone, Copy)]
struct KeyFilter<'a> {
    keys: Keys<'a>,
    declared: &'static [&'static str],
}

impl KeyFilter<'_> {
    fn keep(&self, key: &str) -> bool {
        match self.keys {
            Keys::Declared => self.declared.contains(&key),
            Keys::Except(others) => !others.contains(&key),
        }
    }
}

/// The field names a derived `Deserialize` struct declares (what it passes to
/// `deserialize_struct`).
fn fields_of<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Fields<'a>(&'a Cell<&'static [&'static str]>);
    impl<'de> Deserializer<'de> for Fields<'_> {
        type Error = ValueError;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, ValueError> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, ValueError> {
            self.0.set(fields);
            Err(de::Error::custom("fields read"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let fields = Cell::new(&[][..]);
    let _ = T::deserialize(Fields(&fields));
    fields.get()
}

/// A deserializer that hands the value's top-level mapping only the keys `keys` keeps.
struct OnlyKeys<'a, D> {
    inner: D,
    keys: Keys<'a>,
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for OnlyKeys<'_, D> {
    type Error = D::Error;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        let filter = KeyFilter {
            keys: self.keys,
            declared: fields,
        };
        self.inner
            .deserialize_struct(name, fields, Filtered::new(visitor, filter))
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        let filter = KeyFilter {
            keys: self.keys,
            declared: &[],
        };
        self.inner.deserialize_map(Filtered::new(visitor, filter))
    }

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.deserialize_map(visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct enum identifier
        ignored_any
    }
}

/// The top-level mapping's visitor, and then the mapping itself, with the keys `filter`
/// drops skipped.
struct Filtered<'a, T> {
    inner: T,
    filter: KeyFilter<'a>,
}

impl<'a, T> Filtered<'a, T> {
    fn new(inner: T, filter: KeyFilter<'a>) -> Self {
        Self { inner, filter }
    }
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Filtered<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.inner.visit_map(Filtered::new(map, self.filter))
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_unit()
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Filtered<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        while let Some(key) = self.inner.next_key::<String>()? {
            if self.filter.keep(&key) {
                return seed.deserialize(key.into_deserializer()).map(Some);
            }
            self.inner.next_value::<IgnoredAny>()?;
        }
        Ok(None)
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        self.inner.next_value_seed(seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_declare_their_fields_and_do_not_overlap() {
        let balance = fields_of::<portcullis_balance::Config>();
        let admission = fields_of::<portcullis_admission::Config>();
        let probe = fields_of::<ProbeConfig>();
        assert!(balance.contains(&"upstreams") && balance.contains(&"eject_max"));
        assert_eq!(
            admission,
            [
                "queue_timeout",
                "max_queue",
                "honor_request_timeout",
                "endpoints",
                "adaptive"
            ]
        );
        assert!(probe.contains(&"probe_on_startup"));
        let all = [balance, admission, probe].concat();
        let unique: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(unique.len(), all.len(), "a key in two sections: {all:?}");
    }

    #[test]
    fn each_part_reads_its_keys_with_paths_and_plain_strings() {
        let cfg = from_yaml(
            "listen: 127.0.0.1:1\nfailure_threshold: 4\nendpoints:\n  /w: {headers: {x-v: 2}}\nerror_threshold: 0.5\n",
        )
        .unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:1");
        assert_eq!(cfg.balance.failure_threshold, 4);
        assert_eq!(cfg.probe.error_threshold, 0.5);
        let headers = cfg.admission.endpoints["/w"].headers.as_ref().unwrap();
        assert_eq!(headers["x-v"], "2");
        let e = from_yaml("listen: a\nfailure_threshold: -2\n").unwrap_err();
        assert!(e.to_string().starts_with("failure_threshold: "), "{e}");
        assert_eq!(e.location().map(|l| l.line()), Some(2));
        let e = from_yaml("a: 1\nbogus: 2\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `a`"), "{e}");
    }
}
