// Runs the script of serve's page (gluon_ft/deploy/static/index.html) in Node on a minimal
// fake DOM, so that tests/test_serve.py checks what the page shows for an answer without a
// browser (the Chromium test needs a server and a browser; this takes a tenth of a second).
//
//   node tests/page_harness.js PAGE.html < {"health": {...}, "answer": {...}}
//
// prints what the page shows: {"model", "top_class", "top_prob", "verdict_hidden", "chips",
// "rows", "note", "status"}, each row {"name", "pct", "chosen", "width", "tick"}.
"use strict";
const fs = require("fs");
const vm = require("vm");

class FakeElement {
  constructor(tag) {
    this.tagName = tag;
    this.nodes = [];  // children: FakeElements and strings (text nodes)
    this.className = "";
    this.title = "";
    this.style = {};
    this.dataset = {};
    this.listeners = {};
    const element = this;
    this.classList = {
      add(name) { element.className = [...element.names(), name].join(" "); },
      remove(name) { element.className = element.names().filter((n) => n !== name).join(" "); },
      contains(name) { return element.names().includes(name); },
    };
  }
  names() { return this.className.split(/\s+/).filter(Boolean); }
  get textContent() {
    return this.nodes.map((n) => (typeof n === "string" ? n : n.textContent)).join("");
  }
  set textContent(value) { this.nodes = [String(value)]; }
  get children() { return this.nodes.filter((n) => typeof n !== "string"); }
  append(...nodes) { this.nodes.push(...nodes); }
  replaceChildren(...nodes) { this.nodes = nodes; }
  addEventListener(type, listener) { this.listeners[type] = listener; }
  find(name) { return this.children.find((child) => child.names().includes(name)); }
}

function fakeDocument(html) {
  const elements = {};
  for (const [, tag, id] of html.matchAll(/<(\w+)[^>]*\sid="([^"]+)"/g)) {
    elements[id] = new FakeElement(tag);
  }
  return {
    body: new FakeElement("body"),
    getElementById: (id) => elements[id] || null,
    createElement: (tag) => new FakeElement(tag),
  };
}

async function main() {
  const html = fs.readFileSync(process.argv[2], "utf8");
  const { health, answer } = JSON.parse(fs.readFileSync(0, "utf8"));
  const document = fakeDocument(html);
  const fetch = async () => ({ ok: true, json: async () => health });
  const context = vm.createContext({ document, fetch, console, URL, FormData: class {} });
  vm.runInContext(html.match(/<script>([\s\S]*?)<\/script>/)[1], context);
  await new Promise((resolve) => setImmediate(resolve));  // the page has read /health
  context.render(answer);
  const $ = document.getElementById;
  const rows = $("bars").children.map((row) => ({
    name: row.find("name").textContent,
    pct: row.find("pct").textContent,
    chosen: row.names().includes("chosen"),
    width: row.find("track").find("fill").style.width,
    tick: row.find("track").find("tick")?.style.left ?? null,
  }));
  process.stdout.write(JSON.stringify({
    model: $("model").textContent,
    top_class: $("top-class").textContent,
    top_prob: $("top-prob").textContent,
    verdict_hidden: Boolean($("verdict").hidden),
    chips: $("chips").children.map((chip) => chip.textContent),
    rows,
    note: $("note").textContent,
    status: $("status").textContent,
  }));
}

main().catch((err) => { console.error(err.stack); process.exit(1); });
