package api

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/hsmbridge/hsmbridge/keystore"
)

// Idempotent retries: a key call may carry a `sequence` (a 36-character request serial
// number). The first successful answer to a caller's sequence on a route is remembered, and
// a retry with the same sequence and the same body gets that answer again instead of a
// second operation (a second signature, a second ciphertext). create-key also records its
// sequence in the store, so no daemon ever makes two keys for one; for the other calls the
// memory is this daemon's, for sequenceTTL, at most sequenceMax answers.
const (
	sequenceTTL = 15 * time.Minute
	sequenceMax = 10_000
)

var errSequenceInvalid = &apiError{wireError{http.StatusBadRequest, "KMS.0206", "invalid sequence number"}, ""}

type sequenceAnswer struct {
	request [sha256.Size]byte // the body it answered
	body    []byte
	at      time.Time
}

type sequences struct {
	mu    sync.Mutex
	m     map[string]sequenceAnswer
	order []string // oldest first, to keep at most sequenceMax
}

// sequenceOf reads the body's sequence and puts the body back for the handler. A body
// that is not JSON has none; the handler reports it.
func sequenceOf(w http.ResponseWriter, r *http.Request) (seq string, body []byte, err error) {
	body, err = io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		return "", nil, errBodyTooLarge.with("request body exceeds 64 KiB")
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	if !bytes.Contains(body, []byte(`"sequence"`)) {
		return "", body, nil // the common case: no second JSON parse on the hot path
	}
	var v struct {
		Sequence string `json:"sequence"`
	}
	_ = json.Unmarshal(body, &v)
	if v.Sequence != "" && len(v.Sequence) != 36 {
		return "", nil, errSequenceInvalid.with("sequence must be 36 characters")
	}
	return v.Sequence, body, nil
}

// answered returns the remembered answer to key, if any and for this very request.
func (sq *sequences) answered(key string, body []byte, now time.Time) ([]byte, bool, error) {
	sq.mu.Lock()
	defer sq.mu.Unlock()
	a, ok := sq.m[key]
	if !ok || now.Sub(a.at) > sequenceTTL {
		return nil, false, nil
	}
	if a.request != sha256.Sum256(body) {
		return nil, false, errSequenceInvalid.with("sequence was already used for a different request")
	}
	return a.body, true, nil
}

func (sq *sequences) remember(key string, body, answer []byte, now time.Time) {
	sq.mu.Lock()
	defer sq.mu.Unlock()
	if sq.m == nil {
		sq.m = map[string]sequenceAnswer{}
	}
	if _, ok := sq.m[key]; !ok {
		sq.order = append(sq.order, key)
	}
	sq.m[key] = sequenceAnswer{request: sha256.Sum256(body), body: answer, at: now}
	for len(sq.order) > sequenceMax || (len(sq.order) > 0 && now.Sub(sq.m[sq.order[0]].at) > sequenceTTL) {
		delete(sq.m, sq.order[0])
		sq.order = sq.order[1:]
	}
}

// recorder keeps a copy of what a handler wrote.
type recorder struct {
	http.ResponseWriter
	buf bytes.Buffer
}

func (r *recorder) Write(b []byte) (int, error) {
	r.buf.Write(b)
	return r.ResponseWriter.Write(b)
}

// withSequence runs h, answering a retried sequence from memory.
func (s *Server) withSequence(w http.ResponseWriter, r *http.Request, who keystore.Caller, rt route, h handler) error {
	if !strings.Contains(rt.pattern, "/kms/") {
		return h(s, w, r, who)
	}
	seq, body, err := sequenceOf(w, r)
	if err != nil || seq == "" {
		if err != nil {
			return err
		}
		return h(s, w, r, who)
	}
	key := who.DomainID + "\x00" + rt.name + "\x00" + seq
	now := time.Now()
	answer, ok, err := s.sequences.answered(key, body, now)
	if err != nil {
		return err
	}
	if ok {
		w.Header().Set("Content-Type", "application/json;charset=UTF-8")
		_, _ = w.Write(answer)
		return nil
	}
	rec := &recorder{ResponseWriter: w}
	if err := h(s, rec, r, who); err != nil {
		return err
	}
	s.sequences.remember(key, body, rec.buf.Bytes(), now)
	return nil
}
