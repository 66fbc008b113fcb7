//! Envoy's response flags (`%RESPONSE_FLAGS%`): why a request ended the way it did.

/// A set of response flags, printed as Envoy's short codes joined by `,` (or `-` when empty).
/// Envoy (1.40) prints flags in the order they were set (e.g. `URX,UT`), so the set also
/// remembers that order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponseFlags(pub u32, FlagOrder);

/// Bit indices in the order they were set: up to 12 of 5 bits each, index + 1 so 0 is empty.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlagOrder(u64);

impl FlagOrder {
    const SLOTS: u32 = 12;

    fn push(&mut self, bit: u32) {
        for slot in 0..Self::SLOTS {
            if (self.0 >> (slot * 5)) & 0x1f == 0 {
                self.0 |= u64::from(bit + 1) << (slot * 5);
                return;
            }
        }
    }

    fn bits(self) -> impl Iterator<Item = u32> {
        (0..Self::SLOTS)
            .map(move |slot| ((self.0 >> (slot * 5)) & 0x1f) as u32)
            .take_while(|&b| b != 0)
            .map(|b| b - 1)
    }
}

macro_rules! flags {
    ($($name:ident = $bit:expr, $code:literal;)*) => {
        impl ResponseFlags {
            $(pub const $name: u32 = 1 << $bit;)*
            const CODES: &'static [(u32, &'static str)] = &[$((1 << $bit, $code)),*];
        }
    };
}

flags! {
    FAILED_LOCAL_HEALTH_CHECK = 0, "LH";
    NO_HEALTHY_UPSTREAM = 1, "UH";
    UPSTREAM_REQUEST_TIMEOUT = 2, "UT";
    LOCAL_RESET = 3, "LR";
    UPSTREAM_REMOTE_RESET = 4, "UR";
    UPSTREAM_CONNECTION_FAILURE = 5, "UF";
    UPSTREAM_CONNECTION_TERMINATION = 6, "UC";
    UPSTREAM_OVERFLOW = 7, "UO";
    NO_ROUTE_FOUND = 8, "NR";
    DELAY_INJECTED = 9, "DI";
    FAULT_INJECTED = 10, "FI";
    RATE_LIMITED = 11, "RL";
    UNAUTHORIZED_EXTERNAL_SERVICE = 12, "UAEX";
    RATELIMIT_SERVICE_ERROR = 13, "RLSE";
    DOWNSTREAM_CONNECTION_TERMINATION = 14, "DC";
    UPSTREAM_RETRY_LIMIT_EXCEEDED = 15, "URX";
    STREAM_IDLE_TIMEOUT = 16, "SI";
    INVALID_ENVOY_REQUEST_HEADERS = 17, "IH";
    DOWNSTREAM_PROTOCOL_ERROR = 18, "DPE";
    UPSTREAM_MAX_STREAM_DURATION_REACHED = 19, "UMSDR";
    RESPONSE_FROM_CACHE_FILTER = 20, "RFCF";
    NO_FILTER_CONFIG_FOUND = 21, "NFCF";
    DURATION_TIMEOUT = 22, "DT";
    UPSTREAM_PROTOCOL_ERROR = 23, "UPE";
    NO_CLUSTER_FOUND = 24, "NC";
    OVERLOAD_MANAGER = 25, "OM";
    DNS_RESOLUTION_FAILURE = 26, "DF";
    DROP_OVERLOAD = 27, "DO";
    DOWNSTREAM_REMOTE_RESET = 28, "DR";
    UNCONDITIONAL_DROP_OVERLOAD = 29, "UDO";
    RBAC_ACCESS_DENIED = 30, "RBAC";
}

impl ResponseFlags {
    /// Adds flags; several bits at once are recorded lowest first.
    #[inline]
    pub fn set(&mut self, flag: u32) {
        let mut new = flag & !self.0;
        while new != 0 {
            let bit = new.trailing_zeros();
            self.1.push(bit);
            new &= new - 1;
        }
        self.0 |= flag;
    }
    #[inline]
    pub fn has(self, flag: u32) -> bool {
        self.0 & flag != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The flag bit of an Envoy short code (`"RL"` → `RATE_LIMITED`); 0 when unknown. Filters
    /// name their flags by code.
    pub fn from_code(code: &str) -> u32 {
        Self::CODES
            .iter()
            .find(|(_, c)| *c == code)
            .map_or(0, |(bit, _)| *bit)
    }
}

impl std::fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == 0 {
            return f.write_str("-");
        }
        let mut first = true;
        let mut shown = 0u32;
        let recorded = self.1.bits().map(|b| 1u32 << b);
        // Recorded order first; then any bits set without a record (direct field writes).
        for bit in recorded.chain(Self::CODES.iter().map(|(b, _)| *b)) {
            if self.0 & bit == 0 || shown & bit != 0 {
                continue;
            }
            shown |= bit;
            if let Some((_, code)) = Self::CODES.iter().find(|(b, _)| *b == bit) {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(code)?;
                first = false;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_envoy() {
        assert_eq!(ResponseFlags::default().to_string(), "-");
        let mut f = ResponseFlags::default();
        f.set(ResponseFlags::UPSTREAM_CONNECTION_FAILURE);
        f.set(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
        assert_eq!(f.to_string(), "UF,URX");
        // Envoy 1.40 prints in the order set: `504 URX,UT` after exhausted per-try timeouts.
        let mut f = ResponseFlags::default();
        f.set(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
        f.set(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT);
        f.set(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
        assert_eq!(f.to_string(), "URX,UT");
        assert!(f.has(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT));
    }
}
