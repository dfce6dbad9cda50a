// The labeling page: the queue's next item for this labeler. A rank item shows K samples of the
// current policy (made once per item, on first view, so every labeler ranks the same samples);
// a demo item asks for a written answer. Progress and agreement between labelers come from
// /web/label/stats.

import { api, el, savedKey, signIn, paintRanking } from "./common.js";
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
let me = null;

function setStatus(t) { $("status").textContent = t || ""; }

function showStats(s) {
  const pct = s.items ? Math.round((100 * s.done_by_you) / s.items) : 0;
  $("progress-bar").style.width = `${pct}%`;
  const agree = s.agreement === null ? "no item ranked by two labelers yet"
    : `${(100 * s.agreement).toFixed(0)}% pairwise agreement over ${s.agreement_pairs} labeler pair(s)`;
  const who = s.labelers.map((l) => `${l.name} ${l.done}`).join(", ") || "nobody yet";
  $("stats").textContent = `You: ${s.done_by_you} of ${s.items} items done · agreement: ${agree} · done per labeler: ${who}`;
}

function promptView(turns) {
  return el("div", { class: "prompt-turns" }, ...turns.map((t) => {
    const node = el("div", { class: `msg ${t.role}` });
    node.textContent = (t.role === "system" ? "System: " : "") + t.content;
    return node;
  }));
}

async function samplesFor(item) {
  // Sample K answers from the current policy through the API, then attach them to the item.
  const k = Number($("k").value);
  setStatus(`Sampling ${k} answers...`);
  const r = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: { Authorization: `Bearer ${savedKey()}`, "Content-Type": "application/json" },
    body: JSON.stringify({ model: me.models[0], messages: item.prompt, n: k, temperature: 1.0,
      ...($("max-tokens").value ? { max_tokens: Number($("max-tokens").value) } : {}) }),
  });
  const data = await r.json();
  if (!r.ok) throw new Error(data.error ? data.error.message : `HTTP ${r.status}`);
  try {
    return await api("POST", `/web/label/items/${item.id}/samples`, { request_id: data.id });
  } catch (e) {
    if (e.status === 409) return null; // another labeler attached samples first: load them
    throw e;
  } finally { setStatus(""); }
}

function rankView(item) {
  const order = [];
  const cards = item.samples.map((s, i) => {
    const body = el("div", { class: "body" });
    body.innerHTML = renderMarkdown(s.content);
    const card = el("div", { class: "card answer-card", "data-id": s.message_id },
      el("span", { class: "rank-badge" }), el("div", { class: "meta" }, `Sample ${String.fromCharCode(65 + i)}`), body,
      el("button", { class: "pick", onclick: () => { if (!order.includes(s.message_id)) order.push(s.message_id); paint(); } }, "Next best"));
    return card;
  });
  const save = el("button", { class: "save-ranking", disabled: true, onclick: async () => {
    try {
      await api("POST", "/web/rankings", { message_ids: order });
      setStatus("Ranking saved.");
      await next();
    } catch (e) { setStatus(e.message); }
  } }, "Save ranking");
  const reset = el("button", { class: "link", onclick: () => { order.length = 0; paint(); } }, "Reset");
  const paint = () => paintRanking(cards, order, save);
  return el("div", { class: "compare" }, el("div", { class: "compare-head" }, "Rank the samples from best to worst: click \u201cNext best\u201d in order."),
    el("div", { class: "cards" }, ...cards), el("div", { class: "compare-foot" }, save, reset));
}

function demoView(item) {
  const area = el("textarea", { id: "demo-input", rows: "8", placeholder: "Write the answer you would want the assistant to give." });
  return el("form", { class: "edit-form", onsubmit: async (e) => {
    e.preventDefault();
    try {
      await api("POST", `/web/label/items/${item.id}/demonstration`, { content: area.value });
      setStatus("Demonstration saved.");
      await next();
    } catch (err) { setStatus(err.message); }
  } }, area, el("button", { type: "submit", class: "save-demo" }, "Save demonstration"));
}

let shown = 0; // a newer call of next() wins over one still waiting for the server

async function next() {
  const ticket = ++shown;
  const kind = $("kind").value;
  let { item, stats } = await api("GET", `/web/label/next${kind ? `?kind=${kind}` : ""}`);
  if (ticket !== shown) return;
  showStats(stats);
  const box = $("item");
  if (!item) {
    box.replaceChildren(el("p", { class: "empty" }, "The queue is done. Thank you!"));
    return;
  }
  if (item.kind === "rank" && !item.samples.length) {
    try {
      item = (await samplesFor(item)) || (await api("GET", `/web/label/next?kind=rank`)).item;
    } catch (e) {
      setStatus(e.message);
      return;
    }
  }
  if (ticket !== shown) return;
  box.replaceChildren(el("div", { class: "compare-head" }, item.kind === "rank" ? "Prompt" : "Prompt: write the assistant's answer"),
    promptView(item.prompt), item.kind === "rank" ? rankView(item) : demoView(item));
}

async function main() {
  me = await signIn($("signin"));
  $("who").textContent = me.key.name;
  if (me.key.role === "user") { // the queue answers 403: say why instead of failing
    $("item").replaceChildren(el("p", { class: "empty" },
      `The key ${me.key.prefix}... has the role "user"; the labeling queue needs a labeler key ` +
      `(an admin runs: chatforge keys role ${me.key.name} labeler).`));
    return;
  }
  const params = new URLSearchParams(location.search); // /label?kind=rank&k=3 links straight to a task
  if (params.has("kind")) $("kind").value = params.get("kind");
  if (params.has("k")) $("k").value = params.get("k");
  if (params.has("max_tokens")) $("max-tokens").value = params.get("max_tokens");
  $("kind").addEventListener("change", next);
  await next();
}

main();
