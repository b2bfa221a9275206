// Express 5 as an upstream of the path-spelling differential suite
// (tests/tests/paths.rs): one handler per tier of the reference table, each
// answering which route matched. Usage: node express.js PORT
'use strict';

const express = require('express');

const ROUTES = [
  ['health', '/api/health'],
  ['completions', '/api/v1/chat/completions'],
  ['media', '/api/v1/media/*rest'],
  ['vision', '/api/v1/vision'],
  ['run', '/api/v1/fashion/run'],
  ['subscribe', '/api/v1/fashion/subscribe'],
  ['status', '/api/v1/fashion/status/:id'],
  ['chat', '/api/chat'],
];

const app = express();
for (const [name, path] of ROUTES) {
  app.all(path, (_req, res) => res.type('text/plain').send(`route=${name}\n`));
}
app.listen(Number(process.argv[2]), '127.0.0.1');
