//! The error codes the relay answers with (RFC 8489 14.8, RFC 8656 18), one
//! type from the handler that decides to the ERROR-CODE attribute written.

/// An error response's code; its number and reason phrase come from here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 300: this relay is draining; ALTERNATE-SERVER names where to allocate
    /// instead (RFC 8489 10). Only ever sent signed, to an authenticated request.
    TryAlternate,
    /// 400: malformed or contradictory request.
    BadRequest,
    /// 401: no or wrong credentials (a challenge).
    Unauthorized,
    /// 403: the peer is refused by policy.
    Forbidden,
    /// 420: a comprehension-required attribute this server does not understand.
    UnknownAttribute,
    /// 437: an allocation exists on this 5-tuple, or none does.
    AllocationMismatch,
    /// 438: the nonce expired; retry with the new one.
    StaleNonce,
    /// 440: no relay address of the requested family.
    AddressFamilyNotSupported,
    /// 441: the credentials are not those the allocation was made with.
    WrongCredentials,
    /// 442: REQUESTED-TRANSPORT other than UDP.
    UnsupportedTransportProtocol,
    /// 443: the peer's family does not match the allocation's.
    PeerAddressFamilyMismatch,
    /// 486: the user holds as many allocations as allowed.
    AllocationQuotaReached,
    /// 508: no capacity (ports, descriptors, quotas, draining).
    InsufficientCapacity,
}

impl ErrorCode {
    /// The number in the ERROR-CODE attribute.
    pub const fn code(self) -> u16 {
        match self {
            ErrorCode::TryAlternate => 300,
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::UnknownAttribute => 420,
            ErrorCode::AllocationMismatch => 437,
            ErrorCode::StaleNonce => 438,
            ErrorCode::AddressFamilyNotSupported => 440,
            ErrorCode::WrongCredentials => 441,
            ErrorCode::UnsupportedTransportProtocol => 442,
            ErrorCode::PeerAddressFamilyMismatch => 443,
            ErrorCode::AllocationQuotaReached => 486,
            ErrorCode::InsufficientCapacity => 508,
        }
    }

    /// A short reason phrase (short keeps unauthenticated answers small).
    pub const fn reason(self) -> &'static str {
        match self {
            ErrorCode::TryAlternate => "Try Alternate",
            ErrorCode::BadRequest => "Bad Request",
            ErrorCode::Unauthorized => "Unauthorized",
            ErrorCode::Forbidden => "Forbidden",
            ErrorCode::UnknownAttribute => "Unknown Attribute",
            ErrorCode::AllocationMismatch => "Allocation Mismatch",
            ErrorCode::StaleNonce => "Stale Nonce",
            ErrorCode::AddressFamilyNotSupported => "Address Family not Supported",
            ErrorCode::WrongCredentials => "Wrong Credentials",
            ErrorCode::UnsupportedTransportProtocol => "Unsupported Transport Protocol",
            ErrorCode::PeerAddressFamilyMismatch => "Peer Address Family Mismatch",
            ErrorCode::AllocationQuotaReached => "Allocation Quota Reached",
            ErrorCode::InsufficientCapacity => "Insufficient Capacity",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code(), self.reason())
    }
}
