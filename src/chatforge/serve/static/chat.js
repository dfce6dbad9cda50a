// The chat page. Conversations live on the server (/web/conversations); answers stream from
// /v1/chat/completions and are then attached to the conversation by their response id, so the
// store keeps exactly what the model wrote.

import { api, el, forgetKey, signIn, streamChat, paintRanking } from "./common.js";
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const state = { me: null, conv: null, model: null, busy: null };

function setStatus(text) { $("status").textContent = text || ""; }

function settings() {
  const out = { temperature: Number($("temperature").value), top_p: Number($("top-p").value) };
  if ($("max-tokens").value) out.max_tokens = Number($("max-tokens").value); // empty: what the context window leaves
  return out;
}

// ---- sidebar ---------------------------------------------------------------------------------
async function loadList() {
  const list = await api("GET", "/web/conversations");
  const ul = $("conv-list");
  ul.replaceChildren(...list.map((c) => el("li", { class: state.conv && state.conv.id === c.id ? "active" : "", "data-id": c.id },
    el("button", { class: "title", title: c.title, onclick: () => openConv(c.id) }, c.title),
    el("button", { class: "icon rename", title: "Rename", "aria-label": "Rename", onclick: () => rename(c) }, "✎"),
    el("button", { class: "icon delete", title: "Delete", "aria-label": "Delete", onclick: () => remove(c) }, "🗑"))));
}

async function rename(c) {
  const title = prompt("Rename conversation", c.title);
  if (title === null) return;
  try { await api("PATCH", `/web/conversations/${c.id}`, { title }); } catch (e) { setStatus(e.message); }
  await loadList();
}

async function remove(c) {
  if (!confirm(`Delete "${c.title}"?`)) return;
  await api("DELETE", `/web/conversations/${c.id}`);
  if (state.conv && state.conv.id === c.id) newChat();
  await loadList();
}

function newChat() {
  state.conv = null;
  state.model = null;
  render();
  loadList();
  $("prompt").focus();
}

async function openConv(id) {
  state.conv = await api("GET", `/web/conversations/${id}`);
  const last = [...state.conv.path].reverse().map((m) => byId(m)).find((m) => m.model);
  state.model = last ? `${last.model}@${last.snapshot}` : null;
  render();
  loadList();
}

// ---- the conversation ---------------------------------------------------------------------------
function byId(id) { return state.conv.messages.find((m) => m.id === id); }

function turnsUpTo(id) {
  const out = [];
  for (let m = id && byId(id); m; m = m.parent_id && byId(m.parent_id)) out.unshift({ role: m.role, content: m.content });
  return out;
}

function group(m) {
  // Answers written together by one compare request: shown side by side and ranked.
  if (!m.request_id) return [m];
  return state.conv.messages.filter((x) => x.parent_id === m.parent_id && x.request_id === m.request_id);
}

function bubble(role, content, extra = {}) {
  const body = el("div", { class: "body" });
  body.innerHTML = role === "user" || role === "system" ? "" : renderMarkdown(content);
  if (role === "user" || role === "system") body.textContent = content;
  return el("div", { class: `msg ${role}`, ...extra }, body);
}

function answerActions(m) {
  const fb = state.conv.feedback[m.id] || {};
  const up = el("button", { class: `icon thumb-up${fb.rating === 1 ? " on" : ""}`, title: "Good answer", onclick: () => thumb(m, 1) }, "👍");
  const down = el("button", { class: `icon thumb-down${fb.rating === -1 ? " on" : ""}`, title: "Bad answer", onclick: () => thumbDown(m) }, "👎");
  const edit = el("button", { class: "icon edit", title: "Edit the answer (saved as a better answer)", onclick: () => editAnswer(m) }, "✎");
  const regen = el("button", { class: "icon regenerate", title: "Regenerate", onclick: () => regenerate(m.parent_id) }, "↻");
  const meta = el("span", { class: "meta" }, m.human ? "edited by you" : (m.model ? `${m.model}@${(m.snapshot || "").slice(0, 8)}` : ""));
  return el("div", { class: "actions" }, up, down, edit, regen, meta);
}

function answerBubble(m) {
  const b = bubble("assistant", m.content, { "data-id": m.id });
  if (m.finish_reason === "length") b.append(el("div", { class: "note" }, "(cut at the token limit)"));
  b.append(answerActions(m));
  return b;
}

function comparePanel(answers) {
  const ranking = (state.conv.rankings.slice().reverse().find((r) => r.message_ids.includes(answers[0].id)) || {}).message_ids;
  const order = ranking ? [...ranking] : [];
  const panel = el("div", { class: "compare", "data-parent": answers[0].parent_id });
  const cards = answers.map((m) => {
    const badge = el("span", { class: "rank-badge" });
    const card = el("div", { class: "card answer-card", "data-id": m.id, draggable: ranking ? null : "true" }, badge);
    const body = el("div", { class: "body" });
    body.innerHTML = renderMarkdown(m.content);
    card.append(body);
    if (!ranking) {
      card.append(el("button", { class: "pick", onclick: () => { if (!order.includes(m.id)) order.push(m.id); paint(); } }, "Next best"));
      card.addEventListener("dragstart", (e) => e.dataTransfer.setData("text/plain", m.id));
      card.addEventListener("dragover", (e) => e.preventDefault());
      card.addEventListener("drop", (e) => { // drop answer A on answer B: A goes right before B
        e.preventDefault();
        const a = e.dataTransfer.getData("text/plain");
        const rest = answers.map((x) => x.id).filter((x) => !order.includes(x));
        const full = [...order, ...rest].filter((x) => x !== a);
        full.splice(full.indexOf(m.id), 0, a);
        order.splice(0, order.length, ...full);
        paint();
      });
    }
    card.append(answerActions(m));
    return card;
  });
  const save = el("button", { class: "save-ranking", disabled: true, onclick: () => saveRanking(order) }, "Save ranking");
  const reset = el("button", { class: "link", onclick: () => { order.length = 0; paint(); } }, "Reset");
  const paint = () => paintRanking(cards, order, save);
  panel.append(el("div", { class: "compare-head" }, ranking ? "Your ranking (best first)" : "Rank the answers: click \u201cNext best\u201d in order, or drag one onto another"));
  panel.append(el("div", { class: "cards" }, ...cards));
  if (!ranking) panel.append(el("div", { class: "compare-foot" }, save, reset));
  paint();
  return panel;
}

function render() {
  const box = $("messages");
  box.replaceChildren();
  if (!state.conv) {
    box.append(el("div", { class: "empty" }, "Start a conversation. 中文输入也可以。"));
  } else {
    for (const id of state.conv.path) {
      const m = byId(id);
      if (m.role === "system") box.append(el("div", { class: "msg system" }, el("span", { class: "label" }, "System: "), m.content));
      else if (m.role === "user") box.append(bubble("user", m.content, { "data-id": m.id }));
      else {
        const g = group(m);
        box.append(g.length > 1 ? comparePanel(g) : answerBubble(m));
      }
    }
  }
  const select = $("model");
  if (state.model && [...select.options].some((o) => o.value === state.model)) select.value = state.model;
  box.scrollTop = box.scrollHeight;
}

// ---- asking -------------------------------------------------------------------------------------
function modelFor() {
  const v = $("model").value;
  return v === "auto" ? (state.model || state.me.models[0]) : v;
}

async function ask(parentId, userText) {
  // Stream an answer to the conversation up to parentId (+ userText), then attach it.
  if (state.busy) return;
  if (!state.conv) {
    const system = $("system").value;
    state.conv = await api("POST", "/web/conversations", { system: system.trim() ? system : null });
    state.model = state.conv.model;
    parentId = state.conv.path[state.conv.path.length - 1] || null;
  }
  const turns = turnsUpTo(parentId);
  if (userText !== null) turns.push({ role: "user", content: userText });
  const k = Number($("compare").value);
  const box = $("messages");
  if (userText !== null) box.append(bubble("user", userText));
  const live = [];
  const row = el("div", { class: k > 1 ? "compare streaming" : "streaming" });
  for (let i = 0; i < k; i++) {
    live.push({ text: "", node: bubble("assistant", "", { class: "msg assistant live" }) });
    row.append(live[i].node);
  }
  box.append(row);
  box.scrollTop = box.scrollHeight;
  const controller = new AbortController();
  state.busy = controller;
  $("send").hidden = true;
  $("stop").hidden = false;
  setStatus("");
  let painted = false;
  const paint = () => {
    painted = false;
    live.forEach((l) => { l.node.querySelector(".body").innerHTML = renderMarkdown(l.text); });
    box.scrollTop = box.scrollHeight;
  };
  let result;
  try {
    result = await streamChat({ model: modelFor(), messages: turns, n: k, ...settings() }, controller.signal, (i, text) => {
      live[i].text += text;
      if (!painted) { painted = true; requestAnimationFrame(paint); }
    });
  } catch (e) {
    setStatus(e.message);
    result = { id: null, stopped: true, failed: true };
  } finally {
    state.busy = null;
    $("send").hidden = false;
    $("stop").hidden = true;
  }
  paint();
  if (result.failed && userText === null) return;
  try {
    state.conv = await api("POST", `/web/conversations/${state.conv.id}/turns`,
      { parent_id: parentId, user: userText, request_id: result.stopped ? null : result.id });
    if (result.stopped && !result.failed) setStatus("Stopped: the partial answer is not kept. Regenerate to answer again.");
  } catch (e) {
    setStatus(e.message);
  }
  render();
  if (result.stopped && !result.failed) { // keep the partial answer on screen until the next action
    const partial = bubble("assistant", live[0].text, { class: "msg assistant stopped" });
    partial.append(el("div", { class: "actions" }, el("button", { class: "icon regenerate", title: "Regenerate",
      onclick: () => regenerate(state.conv.path[state.conv.path.length - 1]) }, "↻")));
    $("messages").append(partial);
  }
  loadList();
}

function send(ev) {
  ev.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || state.busy) return;
  $("prompt").value = "";
  let parent = null;
  if (state.conv && state.conv.path.length) {
    parent = state.conv.path[state.conv.path.length - 1];
    if (byId(parent).role === "user") parent = byId(parent).parent_id; // a stopped turn: branch beside it
  }
  ask(parent, text);
}

function regenerate(userMsgId) { ask(userMsgId, null); }

// ---- feedback ---------------------------------------------------------------------------------
async function thumb(m, rating, reason) {
  try {
    await api("POST", "/web/feedback", { message_id: m.id, rating, reason: reason || null });
    state.conv = await api("GET", `/web/conversations/${state.conv.id}`);
    render();
    setStatus(rating === 1 ? "Thanks: marked as a good answer." : "Thanks: marked as a bad answer.");
  } catch (e) { setStatus(e.message); }
}

function thumbDown(m) {
  const node = document.querySelector(`[data-id="${m.id}"]`);
  if (node.querySelector(".reason-form")) return;
  const input = el("input", { class: "reason-input", placeholder: "What was wrong? (optional)", maxlength: "2000" });
  const form = el("form", { class: "reason-form", onsubmit: (e) => { e.preventDefault(); thumb(m, -1, input.value.trim()); } },
    input, el("button", { type: "submit", class: "reason-submit" }, "Send"),
    el("button", { type: "button", class: "link", onclick: () => form.remove() }, "Cancel"));
  node.append(form);
  input.focus();
}

function editAnswer(m) {
  const node = document.querySelector(`[data-id="${m.id}"]`);
  if (node.querySelector(".edit-form")) return;
  const area = el("textarea", { class: "edit-input", rows: "6" });
  area.value = m.content;
  const form = el("form", { class: "edit-form", onsubmit: async (e) => {
    e.preventDefault();
    try {
      await api("POST", "/web/feedback", { message_id: m.id, correction: area.value });
      state.conv = await api("GET", `/web/conversations/${state.conv.id}`);
      render();
      setStatus("Saved your answer: it becomes training data for the next model.");
    } catch (err) { setStatus(err.message); }
  } }, area, el("div", {}, el("button", { type: "submit", class: "edit-save" }, "Save answer"),
    el("button", { type: "button", class: "link", onclick: () => form.remove() }, "Cancel")));
  node.append(form);
  area.focus();
}

async function saveRanking(order) {
  try {
    await api("POST", "/web/rankings", { message_ids: order });
    state.conv = await api("GET", `/web/conversations/${state.conv.id}`);
    render();
    setStatus("Ranking saved; the conversation continues from your best answer.");
  } catch (e) { setStatus(e.message); }
}

// ---- start ------------------------------------------------------------------------------------
async function main() {
  state.me = await signIn($("signin"));
  $("who").textContent = state.me.key.name;
  $("model").replaceChildren(el("option", { value: "auto" }, "auto (A/B)"), ...state.me.models.map((m) => el("option", { value: m }, m)));
  $("new-chat").addEventListener("click", newChat);
  $("sign-out").addEventListener("click", () => { forgetKey(); location.reload(); });
  $("settings-toggle").addEventListener("click", () => { $("settings").hidden = !$("settings").hidden; });
  $("composer").addEventListener("submit", send);
  $("stop").addEventListener("click", () => state.busy && state.busy.abort());
  $("prompt").addEventListener("keydown", (e) => {
    // Enter sends, except while an input method (Chinese, Japanese...) is composing a character.
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) send(e);
  });
  render();
  await loadList();
}

main();
