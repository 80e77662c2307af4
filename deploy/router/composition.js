// Composition affinity for nginx (njs): the routing key of an OpenAI request is the
// composition it asks for, so `hash $composition consistent;` sends every request for one
// composition to the same loramix replica, where its merged adapter is already cached.
//
// key = the body's `model` ("math+code", a named composition, the base model), or, when the
// body has loramix's structured `composition` field, that field with its keys sorted (its
// `model` is then the base model's name and says nothing about the composition).
// A body that is not JSON, or has neither field (GET /v1/models, /health, a malformed
// request), gives the empty key: nginx's hash balancer then falls back to round robin, and
// the replica answers the request itself (a malformed one with loramix's 400 error).
//
// The key is the string as sent: "math+code" and "code+math" are one composition to loramix
// but two keys here. Clients that want one replica per composition send one spelling.

function stable(value) {
    if (Array.isArray(value)) {
        return "[" + value.map(stable).join(",") + "]";
    }
    if (value !== null && typeof value === "object") {
        return "{" + Object.keys(value).sort().map(function (k) {
            return JSON.stringify(k) + ":" + stable(value[k]);
        }).join(",") + "}";
    }
    return JSON.stringify(value);
}

function key(r) {
    var text = r.requestText;  // undefined unless the body is in memory (client_body_buffer_size)
    if (!text) {
        return "";
    }
    var body;
    try {
        body = JSON.parse(text);
    } catch (e) {
        return "";
    }
    if (body === null || typeof body !== "object" || Array.isArray(body)) {
        return "";
    }
    if (body.composition !== undefined && body.composition !== null) {
        return "composition:" + stable(body.composition);
    }
    return typeof body.model === "string" ? body.model : "";
}

export default {key, stable};
