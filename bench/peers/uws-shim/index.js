// weir-bench shim for soketi's `uWebSockets.js` dependency (a git URL that npm cannot fetch here).
// It loads the native addon that the npm package `uws-pack` ships, built for this Node ABI.
'use strict';
const path = require('path');
const fs = require('fs');

const name = `uws_${process.platform}_${process.arch}_${process.versions.modules}.node`;
const roots = [];
if (process.env.WEIR_UWS_PACK_DIR) roots.push(process.env.WEIR_UWS_PACK_DIR);
const searchPaths = [
  ...((require.main && require.main.paths) || []),
  path.join(process.cwd(), 'node_modules'),
  ...module.paths,
];
for (const p of searchPaths) {
  roots.push(path.join(p, 'uws-pack'));
}
let found = null;
for (const root of roots) {
  const candidate = path.join(root, 'dist', 'bin', name);
  if (fs.existsSync(candidate)) { found = candidate; break; }
}
if (!found) {
  throw new Error(`uws shim: ${name} not found in uws-pack (searched ${roots.length} places)`);
}
module.exports = require(found);
