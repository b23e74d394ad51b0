//! Fields of a record that this version of Berth does not know (written by
//! a newer one), kept as read and written back when the record is
//! rewritten: an update by an older berth (an expand, a publish, a phase)
//! must not drop what a newer one recorded. Kept at the top level of a
//! volume's and a snapshot's record and in the sections a record holds: a
//! block volume's (`BlockInfo`, and its disk's `DiskRef`) and a content
//! source (`Source`), and in the values it holds: a capability (the
//! volume's list and a publication's), a publication (`Attachment`), a
//! loop disk's backing file and range (`Kept<FileId>`, `Kept<LoopRange>`).
//! Parameters and contexts are maps, which keep every key anyway. Calls
//! that compare what a request asks with what a record holds compare the
//! known fields only (`Capability::same_as`, `Attachment::same_as`): a
//! retry carries none of a newer berth's.
//!
//! A record without unknown fields costs one empty `Option<Box<Extra>>`
//! (a null pointer) and is read and written by serde's derived code as
//! before: `Capture` only looks at each key's name.
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Error as _, Serialize, Serializer};
use serde_json::value::RawValue;

/// The unknown fields of one record, in the order read, each its JSON.
#[derive(Clone, Debug)]
pub struct Extra(Vec<(String, Box<RawValue>)>);

impl Extra {
    /// The fields' names, in the order read.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_str())
    }

    /// The JSON of field `name`, if kept.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.get())
    }
}

impl PartialEq for Extra {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(&other.0)
                .all(|((a, x), (b, y))| a == b && x.get() == y.get())
    }
}

impl Eq for Extra {}

/// Hashed and ordered as compared (names and JSON text, in the order
/// read): a value held in a set or kept sorted (a capability) with fields
/// a newer berth wrote is another value than one without.
impl std::hash::Hash for Extra {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.len().hash(h);
        for (k, v) in &self.0 {
            k.hash(h);
            v.get().hash(h);
        }
    }
}

impl Ord for Extra {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let theirs = other.0.iter().map(|(k, v)| (k.as_str(), v.get()));
        self.0
            .iter()
            .map(|(k, v)| (k.as_str(), v.get()))
            .cmp(theirs)
    }
}

impl PartialOrd for Extra {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Implements `Serialize` and `Deserialize` for a struct that derives both
/// with `#[serde(remote = "Self")]` and holds the fields it does not know
/// in `extra: Option<Box<Extra>>` (marked `#[serde(skip)]`): its known
/// fields as the derived code reads and writes them, the others kept
/// (`read`) and written back after them (`write`).
macro_rules! keeps_unknown_fields {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                /// The fields the type knows, as the derived code writes them.
                struct Known<'a>(&'a $t);
                impl serde::Serialize for Known<'_> {
                    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                        <$t>::serialize(self.0, s)
                    }
                }
                $crate::state::extra::write(s, &Known(self), self.extra.as_deref())
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let (mut r, extra) = $crate::state::extra::read(d, |c| <$t>::deserialize(c))?;
                r.extra = extra;
                Ok(r)
            }
        }
    };
}
pub(crate) use keeps_unknown_fields;

/// Reads a record with `known` (serde's derived code for its known fields,
/// `#[serde(remote = "Self")]`), keeping the fields it does not name.
pub fn read<'de, D, T>(
    d: D,
    known: impl FnOnce(Capture<'_, D>) -> Result<T, D::Error>,
) -> Result<(T, Option<Box<Extra>>), D::Error>
where
    D: Deserializer<'de>,
{
    let mut kept = Vec::new();
    let v = known(Capture {
        inner: d,
        kept: &mut kept,
    })?;
    let extra = (!kept.is_empty()).then(|| Box::new(Extra(kept)));
    Ok((v, extra))
}

/// Writes a record: `known` (the derived code, as `T`'s JSON object) alone
/// when nothing unknown was kept, else that object with the kept fields
/// after its own, each as it was read (JSON only: records are).
pub fn write<S, T>(s: S, known: &T, extra: Option<&Extra>) -> Result<S::Ok, S::Error>
where
    S: Serializer,
    T: Serialize,
{
    let Some(extra) = extra else {
        return known.serialize(s);
    };
    let mut text = serde_json::to_string(known).map_err(S::Error::custom)?;
    if !text.ends_with('}') {
        return Err(S::Error::custom("a record is not a JSON object"));
    }
    text.pop();
    let mut first = text == "{";
    for (k, raw) in &extra.0 {
        if !first {
            text.push(',');
        }
        first = false;
        text.push_str(&serde_json::to_string(k).map_err(S::Error::custom)?);
        text.push(':');
        text.push_str(raw.get());
    }
    text.push('}');
    RawValue::from_string(text)
        .map_err(S::Error::custom)?
        .serialize(s)
}

/// A deserializer that hands a struct's visitor only the keys it names
/// and keeps the others' values (`read`).
pub struct Capture<'a, D> {
    inner: D,
    kept: &'a mut Vec<(String, Box<RawValue>)>,
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Capture<'_, D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.inner.deserialize_any(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.inner.deserialize_struct(
            name,
            fields,
            Fields {
                visitor,
                fields,
                kept: self.kept,
            },
        )
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

struct Fields<'a, V> {
    visitor: V,
    fields: &'static [&'static str],
    kept: &'a mut Vec<(String, Box<RawValue>)>,
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Fields<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.visitor.expecting(f)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.visitor.visit_map(Known {
            inner: map,
            fields: self.fields,
            kept: self.kept,
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        self.visitor.visit_seq(seq)
    }
}

/// A map's entries whose keys the struct names; the others are kept.
struct Known<'a, A> {
    inner: A,
    fields: &'static [&'static str],
    kept: &'a mut Vec<(String, Box<RawValue>)>,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Known<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        loop {
            let Some(key) = self.inner.next_key_seed(KeySeed)? else {
                return Ok(None);
            };
            let name: &str = match &key {
                Key::Borrowed(k) => k,
                Key::Owned(k) => k,
            };
            if self.fields.contains(&name) {
                return seed
                    .deserialize(de::value::StrDeserializer::<A::Error>::new(name))
                    .map(Some);
            }
            let value: Box<RawValue> = self.inner.next_value()?;
            let name = match key {
                Key::Borrowed(k) => k.to_string(),
                Key::Owned(k) => k,
            };
            self.kept.push((name, value));
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.inner.next_value_seed(seed)
    }
}

/// A key as read: lent by the text when it can be (no copy).
enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key<'de>, D::Error> {
        d.deserialize_str(KeySeed)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
        Ok(Key::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
        Ok(Key::Owned(v.to_string()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
        Ok(Key::Owned(v))
    }
}
