package main

import (
	"crypto/sha256"
	"testing"
)

// TestSequenceMakesRetriesIdempotent: a key call retried with the same sequence gets the
// first answer (an ECDSA signature is random, so a second signing would differ); the same
// sequence on another request, or a malformed one, is refused with KMS.0206.
func TestSequenceMakesRetriesIdempotent(t *testing.T) {
	env := newEnv(t, "c1")
	c, ksID, stop := keysDaemon(t, env)
	defer stop()
	ec := c.createKey(ksID, "seq-ec", "EC_P256", "")
	aes := c.createKey(ksID, "seq-aes", "AES_256", "")
	d := sha256.Sum256([]byte("once"))
	const seq = "6b1f3c2a-1d4e-4f5a-9b8c-7d6e5f4a3b2c"
	sign := map[string]any{"key_id": ec, "message": b64(d[:]), "signing_algorithm": "ECDSA_SHA_256", "sequence": seq}
	first := str(t, c.ok("sign", sign), "signature")
	if again := str(t, c.ok("sign", sign), "signature"); again != first {
		t.Errorf("retried sign with the same sequence gave another signature")
	}
	delete(sign, "sequence")
	if other := str(t, c.ok("sign", sign), "signature"); other == first {
		t.Errorf("a sign without sequence repeated the remembered answer")
	}
	enc := map[string]any{"key_id": aes, "plain_text": "p", "sequence": seq} // same sequence, another route: independent
	ct := str(t, c.ok("encrypt-data", enc), "cipher_text")
	if again := str(t, c.ok("encrypt-data", enc), "cipher_text"); again != ct {
		t.Errorf("retried encrypt with the same sequence gave another ciphertext")
	}
	enc["plain_text"] = "another"
	c.fails("encrypt-data", enc, 400, "KMS.0206", "different request")
	c.fails("sign", map[string]any{"key_id": ec, "message": b64(d[:]), "signing_algorithm": "ECDSA_SHA_256", "sequence": "short"}, 400, "KMS.0206")
}
