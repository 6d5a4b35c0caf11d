package hsm_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/hsmbridge/hsmbridge/hsm"
)

func dataByLabel(t *testing.T, cl *hsm.Cluster) map[string][]byte {
	t.Helper()
	objs, err := cl.DataObjects(t.Context())
	if err != nil {
		t.Fatalf("DataObjects: %v", err)
	}
	m := make(map[string][]byte, len(objs))
	for _, o := range objs {
		if _, dup := m[o.Label]; dup {
			t.Errorf("two data objects labelled %q", o.Label)
		}
		m[o.Label] = o.Value
	}
	return m
}

func TestDataObjects_RoundTrip(t *testing.T) {
	cl, tok := newCluster(t)
	ctx := t.Context()
	if got := dataByLabel(t, cl); len(got) != 0 {
		t.Fatalf("fresh token has data objects %v", got)
	}
	big := bytes.Repeat([]byte{0x00, 0xff, 0x7f, 0x80}, 1024)
	want := map[string][]byte{
		"binding/ks-1": {0x00, 0x01, 0x02, 0x00},
		"binding/ks-2": big,
		"text":         []byte("hello\n"),
	}
	for label, v := range want {
		if err := cl.WriteData(ctx, label, v); err != nil {
			t.Fatalf("WriteData %q: %v", label, err)
		}
	}
	check := func(cl *hsm.Cluster, want map[string][]byte) {
		t.Helper()
		got := dataByLabel(t, cl)
		if len(got) != len(want) {
			t.Errorf("%d data objects, want %d", len(got), len(want))
		}
		for label, v := range want {
			if !bytes.Equal(got[label], v) {
				t.Errorf("data object %q = %x, want %x", label, got[label], v)
			}
		}
	}
	check(cl, want)

	// A second write under a taken label is refused and leaves the first value.
	if err := cl.WriteData(ctx, "text", []byte("other")); !errors.Is(err, hsm.ErrAmbiguous) {
		t.Errorf("second WriteData %q: %v, want ErrAmbiguous", "text", err)
	}
	check(cl, want)

	// Token objects: another cluster on the token sees them after this one is closed.
	if err := cl.Close(ctx); err != nil {
		t.Fatal(err)
	}
	cl = openCluster(t, configFor(tok))
	check(cl, want)

	if err := cl.DestroyData(ctx, "binding/ks-1"); err != nil {
		t.Fatalf("DestroyData: %v", err)
	}
	delete(want, "binding/ks-1")
	check(cl, want)
	for _, label := range []string{"binding/ks-1", "never-written"} {
		if err := cl.DestroyData(ctx, label); err != nil {
			t.Errorf("DestroyData of absent %q: %v, want nil", label, err)
		}
	}
	check(cl, want)

	// A destroyed label may be written again.
	if err := cl.WriteData(ctx, "binding/ks-1", []byte("again")); err != nil {
		t.Fatalf("WriteData after DestroyData: %v", err)
	}
	want["binding/ks-1"] = []byte("again")
	check(cl, want)
}

// TestDataObjects_IdentityNotListed: DataObjects lists only hsmbridge's CKO_DATA objects,
// not the identity key or certificate on the same token.
func TestDataObjects_IdentityNotListed(t *testing.T) {
	cl, _ := newCluster(t)
	if got := dataByLabel(t, cl); len(got) != 0 {
		t.Errorf("data objects on a token holding only an identity: %v", got)
	}
}
