// Pieces both pages use: the signed-in key, JSON calls to the server, and streaming answers from
// the OpenAI endpoint.

const KEY = "chatforge.key";

export function savedKey() { return localStorage.getItem(KEY) || ""; }
export function forgetKey() { localStorage.removeItem(KEY); }

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

export async function api(method, path, body) {
  const opts = { method, headers: { Authorization: `Bearer ${savedKey()}` } };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new ApiError(r.status, (data.error && data.error.message) || `HTTP ${r.status}`);
  return data;
}

// Ask for the key until the server accepts it; resolves with /web/me.
export async function signIn(dialog) {
  const input = dialog.querySelector("input");
  const error = dialog.querySelector(".error");
  if (savedKey()) {
    try { return await api("GET", "/web/me"); } catch (e) { forgetKey(); }
  }
  dialog.hidden = false;
  input.focus();
  return new Promise((resolve) => {
    dialog.querySelector("form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      localStorage.setItem(KEY, input.value.trim());
      try {
        const me = await api("GET", "/web/me");
        dialog.hidden = true;
        resolve(me);
      } catch (e) {
        forgetKey();
        error.textContent = e.message;
      }
    });
  });
}

// POST /v1/chat/completions with stream=true. onDelta(choiceIndex, text) per chunk; resolves with
// {id, finish: [reasons], stopped} when the stream ends or `signal` aborts it.
export async function streamChat(body, signal, onDelta) {
  const r = await fetch("/v1/chat/completions", {
    method: "POST", signal,
    headers: { Authorization: `Bearer ${savedKey()}`, "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, stream: true }),
  });
  if (!r.ok) {
    const data = await r.json().catch(() => ({}));
    throw new ApiError(r.status, (data.error && data.error.message) || `HTTP ${r.status}`);
  }
  const reader = r.body.getReader();
  const decoder = new TextDecoder("utf-8"); // {stream: true} keeps a character split across chunks whole
  let buf = "", id = null;
  const finish = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new ApiError(500, chunk.error.message);
          id = chunk.id || id;
          for (const c of chunk.choices || []) {
            if (c.delta && c.delta.content) onDelta(c.index, c.delta.content);
            if (c.finish_reason) finish[c.index] = c.finish_reason;
          }
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") return { id, finish, stopped: true };
    throw e;
  }
  return { id, finish, stopped: false };
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

// A ranking's state on its cards: each card (by data-id) shows its place in `order` ("#1" = best)
// and looks ranked; `save` is enabled once every card has a place.
export function paintRanking(cards, order, save) {
  cards.forEach((c) => {
    const i = order.indexOf(c.dataset.id);
    c.querySelector(".rank-badge").textContent = i >= 0 ? `#${i + 1}` : "";
    c.classList.toggle("ranked", i >= 0);
  });
  save.disabled = order.length !== cards.length;
}
