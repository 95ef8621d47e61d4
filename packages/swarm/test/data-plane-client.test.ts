import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { createServer as createHttpServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { createServer as createTcpServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { ChunkProtocolError, ChunkStallError, DataPlaneClient, type DataPlaneOrigin, type ResponseHead } from '@shoal/swarm';

/** Runs `body` against a server; its connections are counted and closed at the end. */
async function withServer(server: Server, body: (origin: DataPlaneOrigin, connections: () => number) => Promise<void>): Promise<void> {
  let connections = 0;
  const sockets = new Set<Socket>();
  server.on('connection', (socket: Socket) => {
    connections++;
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  try {
    await body({ host: '127.0.0.1', port: (server.address() as AddressInfo).port }, () => connections);
  } finally {
    for (const socket of sockets) socket.destroy();
    server.close();
  }
}

function http(handler: (req: IncomingMessage, res: ServerResponse) => void): Server {
  return createHttpServer({ keepAliveTimeout: 30_000 }, handler);
}

/** A server that answers every request on a connection with `answer(socket)`. */
function raw(answer: (socket: Socket) => void): Server {
  return createTcpServer((socket) => socket.once('data', () => answer(socket)));
}

const into = (head: ResponseHead): Buffer | undefined => (head.status === 200 ? Buffer.alloc(head.length) : undefined);
const never = new AbortController().signal;

test('bodies land whole in the buffer the caller names; sequential requests share one connection', async () => {
  const data = randomBytes(4 * 1024 * 1024 + 17);
  await withServer(
    http((req, res) => {
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': data.length, 'shoal-chunk': 7 });
      // Written in uneven pieces, so the body spans many reads of every size.
      let at = 0;
      const next = (): void => {
        if (at >= data.length) return void res.end();
        const piece = data.subarray(at, (at += 1 + Math.floor(Math.random() * 300_000)));
        if (res.write(piece)) setImmediate(next);
        else res.once('drain', next);
      };
      next();
    }),
    async (origin, connections) => {
      const client = new DataPlaneClient();
      try {
        for (let i = 0; i < 3; i++) {
          let target: Buffer | undefined;
          const head = await client.get(origin, '/v1/chunks/x/7', { authorization: 'Bearer t' }, never, (h) => (target = into(h)));
          assert.equal(head.status, 200);
          assert.equal(head.headers.get('shoal-chunk'), '7');
          assert.ok(target!.equals(data), `request ${i}: the body is exactly the served bytes`);
        }
        assert.equal(connections(), 1, 'one kept-alive connection');
      } finally {
        client.close();
      }
    },
  );
});

test('error answers resolve with their status and drop their body; headers travel', async () => {
  let seen: IncomingMessage['headers'] | undefined;
  await withServer(
    http((req, res) => {
      seen = req.headers;
      res.writeHead(404, { 'content-length': 9 }).end('not found');
    }),
    async (origin, connections) => {
      const client = new DataPlaneClient();
      try {
        let asked = 0;
        for (let i = 0; i < 2; i++) {
          const head = await client.get(origin, '/v1/chunks/y/pick', { 'shoal-want': 'AQI=' }, never, (h) => (asked++, into(h)));
          assert.equal(head.status, 404);
        }
        assert.equal(asked, 2);
        assert.equal(seen?.['shoal-want'], 'AQI=');
        assert.equal(connections(), 1, 'the dropped body left the connection usable');
      } finally {
        client.close();
      }
    },
  );
});

test('answers that break HTTP or their own length are refused with ChunkProtocolError', async () => {
  const cases: Record<string, string> = {
    'more bytes than announced': 'HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabcdef',
    'no content-length': 'HTTP/1.1 200 OK\r\n\r\nabc',
    'chunked encoding': 'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n',
    'two content-lengths': 'HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabc',
    'not HTTP': 'SSH-2.0-OpenSSH\r\n\r\n',
    'a head that never ends': `HTTP/1.1 200 OK\r\nx: ${'a'.repeat(20_000)}`,
    'a large body nobody wants': 'HTTP/1.1 500 Oops\r\ncontent-length: 1000000\r\n\r\n',
  };
  for (const [name, answer] of Object.entries(cases)) {
    await withServer(
      raw((socket) => socket.write(answer)),
      async (origin) => {
        const client = new DataPlaneClient({ stallTimeoutMs: 2_000 });
        try {
          await assert.rejects(client.get(origin, '/x', {}, never, into), ChunkProtocolError, name);
        } finally {
          client.close();
        }
      },
    );
  }
});

test('a body cut short, a stalled server and an abort each reject; the refusal of the target closes the request', async () => {
  await withServer(
    raw((socket) => socket.end('HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc')),
    async (origin) => {
      const client = new DataPlaneClient();
      await assert.rejects(client.get(origin, '/x', {}, never, into), /closed/);
      client.close();
    },
  );
  await withServer(
    raw((socket) => socket.write('HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc')),
    async (origin) => {
      const client = new DataPlaneClient({ stallTimeoutMs: 200 });
      await assert.rejects(client.get(origin, '/x', {}, never, into), ChunkStallError);
      const controller = new AbortController();
      const pending = client.get(origin, '/x', {}, controller.signal, into);
      setTimeout(() => controller.abort(new Error('no longer wanted')), 50);
      await assert.rejects(pending, /no longer wanted/);
      const refused = new ChunkProtocolError('wrong length');
      await assert.rejects(
        client.get(origin, '/x', {}, never, () => {
          throw refused;
        }),
        (err) => err === refused,
      );
      client.close();
    },
  );
});

test('a kept-alive connection that the server closes as a request arrives is replaced, and the request succeeds', async () => {
  // Each connection answers one request and drops the next unanswered, as a server does whose
  // keep-alive ran out just as the request was sent.
  const server = createTcpServer((socket) => {
    let requests = 0;
    socket.on('data', () => {
      if (++requests === 1) socket.write('HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok');
      else socket.destroy();
    });
  });
  await withServer(server, async (origin, connections) => {
    const client = new DataPlaneClient();
    try {
      for (let i = 0; i < 3; i++) {
        let target: Buffer | undefined;
        const head = await client.get(origin, '/x', {}, never, (h) => (target = into(h)));
        assert.equal(head.status, 200);
        assert.equal(target!.toString(), 'ok');
      }
      assert.equal(connections(), 3, 'requests 2 and 3 each found their pooled connection dropped and went on a new one');
    } finally {
      client.close();
    }
  });
});

test('requests with line breaks or other bytes outside HTTP tokens are refused before anything is sent', async () => {
  const client = new DataPlaneClient();
  const origin = { host: '127.0.0.1', port: 9 };
  await assert.rejects(client.get(origin, '/x', { authorization: 'Bearer a\r\nx-injected: 1' }, never, into), TypeError);
  await assert.rejects(client.get(origin, '/x y\r\n', {}, never, into), TypeError);
  client.close();
});
