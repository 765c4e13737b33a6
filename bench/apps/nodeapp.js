// A tiny Node web app for the scale-to-zero benchmark: node's http server on
// the Unix socket $SOCKET_PATH.
const http = require("http");
const fs = require("fs");

const path = process.env.SOCKET_PATH;
try { fs.unlinkSync(path); } catch (e) { /* no stale socket */ }
http.createServer((req, res) => {
  const body = req.url === "/health" ? "ok\n" : `hello from ${process.env.INSTANCE_ID || "node"}\n`;
  res.writeHead(200, { "content-type": "text/plain", "content-length": Buffer.byteLength(body) });
  res.end(body);
}).listen(path);
process.on("SIGTERM", () => process.exit(0));
