// Bun's built-in pub/sub (uWebSockets) as a peer. Protocol for the load generator:
//   text frame "S <topic>"  -> ws.subscribe(topic)
//   text frame "P"          -> replies "P" (a barrier: everything sent before is handled)
//   binary frame            -> a batch of publishes, each [u16 topic length][topic][u32 payload length][payload],
//                              each delivered with server.publish(topic, payload)
const port = Number(process.argv[2]);
const decoder = new TextDecoder();
const server = Bun.serve({
  hostname: "127.0.0.1",
  port,
  fetch(req, server) {
    if (server.upgrade(req)) return;
    return new Response("websocket only", { status: 400 });
  },
  websocket: {
    maxPayloadLength: 16 * 1024 * 1024,
    backpressureLimit: 64 * 1024 * 1024,
    closeOnBackpressureLimit: false,
    perMessageDeflate: false,
    idleTimeout: 0,
    message(ws, message) {
      if (typeof message === "string") {
        if (message.startsWith("S ")) ws.subscribe(message.slice(2));
        else if (message === "P") ws.send("P");
        return;
      }
      const bytes = new Uint8Array(message.buffer, message.byteOffset, message.byteLength);
      const view = new DataView(message.buffer, message.byteOffset, message.byteLength);
      let off = 0;
      while (off < bytes.length) {
        const tlen = view.getUint16(off);
        const topic = decoder.decode(bytes.subarray(off + 2, off + 2 + tlen));
        off += 2 + tlen;
        const plen = view.getUint32(off);
        off += 4;
        server.publish(topic, bytes.subarray(off, off + plen));
        off += plen;
      }
    },
  },
});
console.log(`listening ${server.port}`);
