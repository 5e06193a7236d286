//! The Sparkplug B payload (`org.eclipse.tahu.protobuf.Payload`), written from the message
//! definition in the Sparkplug 3.0 specification, chapter 6 (`sparkplug_b.proto`), as prost
//! messages: prost does the wire encoding. Only what the gateway sends is declared: metadata,
//! property sets, data sets, templates and extensions are omitted, and a decoder skips the
//! field numbers it does not know, as protobuf requires.

/// `Payload`: one Sparkplug message body.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    /// Milliseconds since the epoch (UTC).
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    /// 0–255; absent on NDEATH.
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
    #[prost(string, optional, tag = "4")]
    pub uuid: Option<String>,
    #[prost(bytes = "vec", optional, tag = "5")]
    pub body: Option<Vec<u8>>,
}

/// `Payload.Metric`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    /// A [`DataType`].
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    #[prost(oneof = "Value", tags = "10, 11, 12, 13, 14, 15, 16")]
    pub value: Option<Value>,
}

/// `Payload.Metric.value`: the scalar members of the oneof.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Value {
    #[prost(uint32, tag = "10")]
    Int(u32),
    /// Int64 (as its two's complement) and UInt64.
    #[prost(uint64, tag = "11")]
    Long(u64),
    #[prost(float, tag = "12")]
    Float(f32),
    #[prost(double, tag = "13")]
    Double(f64),
    #[prost(bool, tag = "14")]
    Boolean(bool),
    #[prost(string, tag = "15")]
    String(String),
    #[prost(bytes = "vec", tag = "16")]
    Bytes(Vec<u8>),
}

/// `DataType`: the numbers the specification gives the types the gateway uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum DataType {
    Int64 = 4,
    UInt64 = 8,
    Double = 10,
    Boolean = 11,
    String = 12,
}

impl DataType {
    /// Its name in the specification (the closing note's captures, logs).
    pub fn name(self) -> &'static str {
        match self {
            DataType::Int64 => "Int64",
            DataType::UInt64 => "UInt64",
            DataType::Double => "Double",
            DataType::Boolean => "Boolean",
            DataType::String => "String",
        }
    }
}
