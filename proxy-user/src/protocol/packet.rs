//! Constructors and classification for [`Packet`]s, and the konduit feature set.

use bytes::Bytes;

use super::pb::{
    CloseDial, CloseRequest, CloseResponse, Data, DialRequest, DialResponse, Drain, Packet, PacketType, WindowUpdate,
    packet::Payload,
};

/// A packet's meaning, checked against its payload. Built by [`PacketKind::of`].
#[derive(Debug, Clone, PartialEq)]
pub enum PacketKind {
    DialRequest { protocol: String, address: String, random: i64, relay_ticket: Bytes, half_close: bool },
    DialResponse { random: i64, connect_id: i64, error: Option<String>, relayed: bool },
    CloseRequest { connect_id: i64 },
    CloseResponse { connect_id: i64, error: Option<String> },
    Data { connect_id: i64, data: Bytes, error: Option<String>, eof: bool },
    DialClose { random: i64 },
    Drain,
    WindowUpdate { connect_id: i64, bytes: u64 },
}

/// Why a packet could not be understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("packet type {0} is unknown")]
    UnknownType(i32),
    #[error("packet type {kind:?} carries no {kind:?} payload")]
    MissingPayload { kind: PacketType },
    #[error("window update of {0} bytes is not positive")]
    BadWindow(i64),
}

fn non_empty(s: String) -> Option<String> {
    if s.is_empty() { None } else { Some(s) }
}

impl PacketKind {
    /// Classifies a received packet, rejecting a type whose payload is missing.
    pub fn of(packet: Packet) -> Result<Self, PacketError> {
        let kind = PacketType::try_from(packet.r#type).map_err(|_| PacketError::UnknownType(packet.r#type))?;
        let missing = || PacketError::MissingPayload { kind };
        Ok(match (kind, packet.payload) {
            (PacketType::DialReq, Some(Payload::DialRequest(d))) => PacketKind::DialRequest {
                protocol: d.protocol,
                address: d.address,
                random: d.random,
                relay_ticket: d.relay_ticket,
                half_close: d.half_close,
            },
            (PacketType::DialRsp, Some(Payload::DialResponse(d))) => PacketKind::DialResponse {
                random: d.random,
                connect_id: d.connect_id,
                error: non_empty(d.error),
                relayed: d.relayed,
            },
            (PacketType::CloseReq, Some(Payload::CloseRequest(c))) => {
                PacketKind::CloseRequest { connect_id: c.connect_id }
            }
            (PacketType::CloseRsp, Some(Payload::CloseResponse(c))) => {
                PacketKind::CloseResponse { connect_id: c.connect_id, error: non_empty(c.error) }
            }
            (PacketType::Data, Some(Payload::Data(d))) => {
                PacketKind::Data { connect_id: d.connect_id, data: d.data, error: non_empty(d.error), eof: d.eof }
            }
            (PacketType::DialCls, Some(Payload::CloseDial(c))) => PacketKind::DialClose { random: c.random },
            // Stock agents send DRAIN with or without the empty payload.
            (PacketType::Drain, _) => PacketKind::Drain,
            (PacketType::WindowUpdate, Some(Payload::WindowUpdate(w))) => {
                let bytes = u64::try_from(w.bytes).ok().filter(|b| *b > 0).ok_or(PacketError::BadWindow(w.bytes))?;
                PacketKind::WindowUpdate { connect_id: w.connect_id, bytes }
            }
            _ => return Err(missing()),
        })
    }

    /// The packet that carries this meaning on the wire.
    pub fn into_packet(self) -> Packet {
        let (kind, payload) = match self {
            PacketKind::DialRequest { protocol, address, random, relay_ticket, half_close } => (
                PacketType::DialReq,
                Payload::DialRequest(DialRequest { protocol, address, random, relay_ticket, half_close }),
            ),
            PacketKind::DialResponse { random, connect_id, error, relayed } => (
                PacketType::DialRsp,
                Payload::DialResponse(DialResponse { error: error.unwrap_or_default(), connect_id, random, relayed }),
            ),
            PacketKind::CloseRequest { connect_id } => {
                (PacketType::CloseReq, Payload::CloseRequest(CloseRequest { connect_id }))
            }
            PacketKind::CloseResponse { connect_id, error } => (
                PacketType::CloseRsp,
                Payload::CloseResponse(CloseResponse { error: error.unwrap_or_default(), connect_id }),
            ),
            PacketKind::Data { connect_id, data, error, eof } => {
                (PacketType::Data, Payload::Data(Data { connect_id, error: error.unwrap_or_default(), data, eof }))
            }
            PacketKind::DialClose { random } => (PacketType::DialCls, Payload::CloseDial(CloseDial { random })),
            PacketKind::Drain => (PacketType::Drain, Payload::Drain(Drain {})),
            PacketKind::WindowUpdate { connect_id, bytes } => (
                PacketType::WindowUpdate,
                Payload::WindowUpdate(WindowUpdate { connect_id, bytes: i64::try_from(bytes).unwrap_or(i64::MAX) }),
            ),
        };
        Packet { r#type: kind as i32, payload: Some(payload) }
    }
}

/// Shorthand constructors for the packets konduit sends most.
pub fn data(connect_id: i64, data: Bytes) -> Packet {
    PacketKind::Data { connect_id, data, error: None, eof: false }.into_packet()
}

/// konduit extensions a peer advertised in its Connect metadata or headers.
/// Stock peers advertise none, and get exactly the stock protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// Per-connection credit with WINDOW_UPDATE packets.
    pub flow_control: bool,
    /// DATA with `eof` half-closes one direction.
    pub half_close: bool,
    /// Tunnelled bytes may travel on a relay socket (one per connection).
    pub relay: bool,
}

impl Features {
    const FLOW_CONTROL: &'static str = "flow-control";
    const HALF_CLOSE: &'static str = "half-close";
    const RELAY: &'static str = "relay";

    /// Everything this build of konduit speaks.
    pub const ALL: Features = Features { flow_control: true, half_close: true, relay: true };

    /// Parses the comma-separated header value; unknown names are ignored so
    /// that newer peers can advertise more.
    pub fn parse(value: &str) -> Self {
        let mut features = Features::default();
        for name in value.split(',').map(str::trim) {
            match name {
                Self::FLOW_CONTROL => features.flow_control = true,
                Self::HALF_CLOSE => features.half_close = true,
                Self::RELAY => features.relay = true,
                _ => {}
            }
        }
        features
    }

    /// The header value advertising these features.
    pub fn header_value(&self) -> String {
        let mut names = Vec::new();
        if self.flow_control {
            names.push(Self::FLOW_CONTROL);
        }
        if self.half_close {
            names.push(Self::HALF_CLOSE);
        }
        if self.relay {
            names.push(Self::RELAY);
        }
        names.join(",")
    }

    /// What both sides speak.
    pub fn common(self, other: Features) -> Features {
        Features {
            flow_control: self.flow_control && other.flow_control,
            half_close: self.half_close && other.half_close,
            relay: self.relay && other.relay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn round_trip(kind: PacketKind) -> PacketKind {
        let bytes = kind.clone().into_packet().encode_to_vec();
        let packet = Packet::decode(bytes.as_slice()).expect("decodes");
        PacketKind::of(packet).expect("classifies")
    }

    #[test]
    fn every_packet_kind_survives_the_wire() {
        let kinds = [
            PacketKind::DialRequest {
                protocol: "tcp".into(),
                address: "10.0.0.1:10250".into(),
                random: -7,
                relay_ticket: Bytes::from_static(b"t"),
                half_close: true,
            },
            PacketKind::DialResponse { random: 1, connect_id: 2, error: None, relayed: true },
            PacketKind::DialResponse { random: 1, connect_id: 0, error: Some("refused".into()), relayed: false },
            PacketKind::CloseRequest { connect_id: 3 },
            PacketKind::CloseResponse { connect_id: 3, error: None },
            PacketKind::Data { connect_id: 4, data: Bytes::from_static(b"xy"), error: None, eof: true },
            PacketKind::DialClose { random: 5 },
            PacketKind::Drain,
            PacketKind::WindowUpdate { connect_id: 6, bytes: 65536 },
        ];
        for kind in kinds {
            assert_eq!(round_trip(kind.clone()), kind);
        }
    }

    #[test]
    fn stock_field_numbers_are_kept() {
        // DATA{connectID=1, data="a"} as a stock peer encodes it.
        let stock = [0x08, 0x04, 0x22, 0x05, 0x08, 0x01, 0x1a, 0x01, b'a'];
        let packet = Packet::decode(&stock[..]).expect("decodes");
        assert_eq!(
            PacketKind::of(packet),
            Ok(PacketKind::Data { connect_id: 1, data: Bytes::from_static(b"a"), error: None, eof: false })
        );
    }

    #[test]
    fn unknown_type_and_missing_payload_are_errors() {
        let unknown = Packet { r#type: 99, payload: None };
        assert_eq!(PacketKind::of(unknown), Err(PacketError::UnknownType(99)));
        let empty_data = Packet { r#type: PacketType::Data as i32, payload: None };
        assert!(matches!(PacketKind::of(empty_data), Err(PacketError::MissingPayload { .. })));
        let bad_window = Packet {
            r#type: PacketType::WindowUpdate as i32,
            payload: Some(Payload::WindowUpdate(WindowUpdate { connect_id: 1, bytes: -5 })),
        };
        assert_eq!(PacketKind::of(bad_window), Err(PacketError::BadWindow(-5)));
    }

    #[test]
    fn features_ignore_unknown_names_and_intersect() {
        let f = Features::parse("half-close, future-thing,flow-control,relay");
        assert_eq!(f, Features::ALL);
        assert_eq!(Features::parse(""), Features::default());
        let only_half = Features { half_close: true, ..Default::default() };
        assert_eq!(Features::ALL.common(only_half), only_half);
        assert_eq!(Features::parse(&Features::ALL.header_value()), Features::ALL);
    }
}
