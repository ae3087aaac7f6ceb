"""The states of a client connection (broker.server.connection) and the write-buffer marks of a
TLS transport, shared by the parts of `Connection`: opening, plain HTTP requests, closing."""

# REFUSED: refused at accept, its answer written; closed once the client's first bytes are
# read (closing with unread bytes would reset the connection, and the answer with it) or after
# REFUSAL_LINGER_S.
# BODY: reading the body of a fallback POST; STREAMING: carrying a fallback event stream
# (broker.server.fallback), whose session is not the connection's.
HANDSHAKE, OPEN, CLOSING, CLOSED, REFUSED, BODY, STREAMING = range(7)

# Where a TLS transport pauses the writer: where a plain uvloop transport does (64 KiB, and
# resumes at a quarter of it). uvloop's TLS transport would first hold up to 512 KiB of the
# connection's own ciphertext, and what it has passed on to the TCP transport below it is not
# in get_write_buffer_size: with the plain bound, the bytes the broker does not count stay
# about as few as on a plain connection, and a lagging connection's queue stays in the broker,
# as pieces shared with the other subscribers, rather than as private ciphertext.
TLS_WRITE_HIGH_WATER = 64 << 10

