// The node dashboard: polls the control API's JSON endpoints and redraws. Every string from
// the API goes in through textContent (peer names, labels and services come from the network),
// never through innerHTML.
import { formatAgo, formatBytes, shortDigest, shortPeerId } from './format.js';

const POLL_MS = 2000;

async function getJson(path) {
  const res = await fetch(path, { cache: 'no-store' });
  if (!res.ok) throw new Error(`${path}: HTTP ${res.status}`);
  return res.json();
}

/** An element with text or child nodes; attributes are set as properties, never parsed as HTML. */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  node.append(...children.map((c) => (c instanceof Node ? c : String(c))));
  return node;
}

function formatDuration(ms) {
  const s = Math.floor(ms / 1000);
  const [d, h, m] = [Math.floor(s / 86400), Math.floor((s % 86400) / 3600), Math.floor((s % 3600) / 60)];
  if (d > 0) return `${d}d ${h}h`;
  if (h > 0) return `${h}h ${m}m`;
  if (m > 0) return `${m}m ${s % 60}s`;
  return `${s}s`;
}

const sum = (values) => values.reduce((a, b) => a + b, 0);

function setText(id, text) {
  document.getElementById(id).textContent = text;
}

/** A counter card: the formatted figure, with the exact number in data-value and the title. */
function setCounter(id, value, format = String, detail = '') {
  const node = document.getElementById(id);
  node.textContent = format(value);
  node.dataset.value = String(value);
  node.title = detail || String(value);
}

function fillTable(id, rows, columns, empty) {
  const body = document.querySelector(`#${id} tbody`);
  if (rows.length === 0) {
    body.replaceChildren(el('tr', {}, el('td', { colSpan: columns, className: 'empty' }, empty)));
    return;
  }
  body.replaceChildren(...rows.map((cells) => el('tr', {}, ...cells)));
}

function renderNode(stats) {
  const { node } = stats;
  document.title = `Shoal: ${node.name}`;
  setText('node-name', node.name);
  setText('node-version', node.version);
  setText('node-peer-id', node.peerId);
  setText('node-gateway', node.gatewayUrl);
  setText('node-uptime', formatDuration(node.now - node.startedAt));
}

function renderCounters({ gateway, swarm, upstream, store, mesh }) {
  const byPath = (b) => `data plane ${formatBytes(b.dataPlane)}, libp2p ${formatBytes(b.libp2p)}`;
  setCounter('stat-gateway-requests', sum(gateway.requests.map((r) => r.count)));
  setCounter('stat-bytes-served', sum(Object.values(gateway.bytesSent)), formatBytes);
  setCounter('stat-bytes-mesh', swarm.bytesReceived.dataPlane + swarm.bytesReceived.libp2p, formatBytes, byPath(swarm.bytesReceived));
  setCounter('stat-bytes-upstream', upstream.bytesReceived, formatBytes);
  setCounter('stat-bytes-uploaded', swarm.bytesUploaded.dataPlane + swarm.bytesUploaded.libp2p, formatBytes, byPath(swarm.bytesUploaded));
  setCounter('stat-chunks-rejected', swarm.chunksRejected);
  setCounter('stat-peers-banned', swarm.peersBanned);
  setCounter(
    'stat-probes-unanswered',
    mesh.probes.unanswered,
    String,
    `${mesh.probes.answered} answered; suspicions sent ${mesh.suspicions.sent}, received ${mesh.suspicions.received}; heartbeats rejected ${mesh.heartbeatsRejected}; relays sent ${mesh.relays.sent}, received ${mesh.relays.received}; beacon records ${mesh.beaconRecords}`,
  );
  setCounter('stat-transfers-active', swarm.activeTransfers);
  setCounter('stat-store-blobs', store.blobs);
  setCounter('stat-store-bytes', store.bytes, formatBytes);
}

function renderTransfers(transfers, names) {
  const rows = transfers.map((t) => {
    const percent = t.chunks ? Math.floor((100 * t.chunksHeld) / t.chunks) : 0;
    const filled = el('span');
    filled.style.width = `${percent}%`;
    const sources = Object.entries(t.sources).map(([peer, bytes]) => el('span', { className: 'chip' }, `${names.get(peer) ?? shortPeerId(peer)}: ${formatBytes(bytes)}`));
    return [
      el('td', { className: 'mono', title: t.blob }, shortDigest(t.blob)),
      el('td', { className: `status-${t.state}` }, t.state),
      el('td', { className: 'num' }, el('span', { className: 'bar' }, filled), `${percent} %`),
      el('td', { className: 'num' }, `${formatBytes(t.rate)}/s`),
      el('td', {}, ...sources),
    ];
  });
  fillTable('transfers', rows, 5, 'no blob is being fetched from the mesh');
}

function renderImages(images) {
  const rows = images.map((i) => [
    el('td', {}, i.repository),
    el('td', {}, i.tag),
    el('td', { className: 'mono', title: i.digest }, shortDigest(i.digest)),
    el('td', { className: 'num' }, formatBytes(i.size)),
  ]);
  fillTable('images', rows, 4, 'the store holds no tagged image');
}

function renderPeers(peers, now) {
  const rows = peers.map((p) => [
    el('td', {}, p.name, p.self ? el('span', { className: 'chip' }, 'this node') : ''),
    el('td', { className: `status-${p.status}` }, p.status),
    el('td', {}, p.self ? '-' : formatAgo(now - p.lastSeen)),
    el('td', { className: 'mono' }, p.gateway ?? '-'),
    el('td', {}, ...Object.entries(p.labels).map(([k, v]) => el('span', { className: 'chip' }, `${k}=${v}`))),
  ]);
  fillTable('peers', rows, 5, 'the mesh is not running yet');
}

function renderServices(services) {
  const rows = services.map((s) => [
    el('td', {}, s.name),
    el('td', {}, s.device),
    el('td', { className: 'mono' }, s.endpoint),
    el('td', {}, s.protocol ?? ''),
    el('td', { className: `status-${s.status}` }, s.status),
  ]);
  fillTable('services', rows, 5, 'no service is registered in the mesh');
}

async function refresh() {
  const status = document.getElementById('status');
  try {
    const [stats, peers, services, images, transfers] = await Promise.all(
      ['/api/stats', '/api/peers', '/api/services', '/api/images', '/api/transfers'].map(getJson),
    );
    // Ages use the node's clock: the browser's may be set differently.
    const now = stats.node.now;
    renderNode(stats);
    renderCounters(stats);
    renderTransfers(transfers, new Map(peers.map((p) => [p.peerId, p.name])));
    renderImages(images);
    renderPeers(peers, now);
    renderServices(services);
    status.textContent = `updated ${new Date().toLocaleTimeString()}`;
    status.classList.remove('error');
  } catch (err) {
    status.textContent = `cannot reach the node: ${err.message}`;
    status.classList.add('error');
  } finally {
    setTimeout(refresh, POLL_MS);
  }
}

refresh();
