package secretfile

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRead(t *testing.T) {
	own := os.Getgid()
	tests := []struct {
		mode    os.FileMode
		gid     int
		wantErr string
	}{
		{0o600, own, ""},
		{0o400, own, ""},
		{0o440, own, ""},                // a Kubernetes Secret under fsGroup
		{0o640, 65533, "has mode 0640"}, // a group that is not ours
		{0o660, own, "has mode 0660"},   // the group may write it
		{0o604, own, "has mode 0604"},
		{0o610, own, "has mode 0610"},
	}
	for _, tt := range tests {
		name := filepath.Join(t.TempDir(), "secret")
		if err := os.WriteFile(name, []byte("s3cret"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(name, tt.mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(name, -1, tt.gid); err != nil {
			t.Skipf("chown to group %d: %v (needs root)", tt.gid, err)
		}
		b, err := Read(name, 64)
		switch {
		case tt.wantErr == "" && (err != nil || string(b) != "s3cret"):
			t.Errorf("mode %04o gid %d: %q, %v; want the contents", tt.mode, tt.gid, b, err)
		case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
			t.Errorf("mode %04o gid %d: err %v, want %q", tt.mode, tt.gid, err, tt.wantErr)
		}
	}
	big := filepath.Join(t.TempDir(), "big")
	if err := os.WriteFile(big, make([]byte, 65), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Read(big, 64); err == nil {
		t.Error("a file over the limit was read")
	}
	if _, err := Read(t.TempDir(), 64); err == nil {
		t.Error("a directory was read")
	}
}
