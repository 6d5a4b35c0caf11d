package hsm

import (
	"context"
	"fmt"

	"github.com/miekg/pkcs11"
)

// dataApplication is CKA_APPLICATION of every data object hsmbridge writes, so it can tell
// its own objects from anyone else's on a shared token.
const dataApplication = "hsmbridge"

// DataObject is a CKO_DATA object of ours on the token.
type DataObject struct {
	Label string
	Value []byte
}

func dataTemplate(label string) []*pkcs11.Attribute {
	t := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
		pkcs11.NewAttribute(pkcs11.CKA_APPLICATION, dataApplication),
	}
	if label != "" {
		t = append(t, pkcs11.NewAttribute(pkcs11.CKA_LABEL, label))
	}
	return t
}

// WriteData stores a private token object with label and value. It refuses to write a
// second object under a label that is already taken.
func (c *Cluster) WriteData(ctx context.Context, label string, value []byte) error {
	err := exec(ctx, c, false, func(s *Session) error {
		hs, err := s.find(dataTemplate(label), 1)
		if err != nil {
			return err
		}
		if len(hs) > 0 {
			return fmt.Errorf("%w: data object %q exists", ErrAmbiguous, label)
		}
		_, err = s.createObject(append(dataTemplate(label),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
			pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE, value),
		))
		return err
	})
	if err != nil {
		return fmt.Errorf("cluster %s: write data object %q: %w", c.id, label, err)
	}
	return nil
}

// DataObjects returns every data object of ours on the token.
func (c *Cluster) DataObjects(ctx context.Context) ([]DataObject, error) {
	objs, err := run(ctx, c, true, func(s *Session) ([]DataObject, error) {
		hs, err := s.find(dataTemplate(""), 0)
		if err != nil {
			return nil, err
		}
		out := make([]DataObject, 0, len(hs))
		for _, h := range hs {
			v, err := s.attributes(h, pkcs11.CKA_LABEL, pkcs11.CKA_VALUE)
			if err != nil {
				return nil, err
			}
			out = append(out, DataObject{Label: string(v[0]), Value: v[1]})
		}
		return out, nil
	})
	if err != nil {
		return nil, fmt.Errorf("cluster %s: list data objects: %w", c.id, err)
	}
	return objs, nil
}

// DestroyData removes every data object of ours with label. Removing one that is not there
// is not an error: repair after a crash may run it twice.
func (c *Cluster) DestroyData(ctx context.Context, label string) error {
	err := exec(ctx, c, true, func(s *Session) error { return s.destroyAll(dataTemplate(label)) })
	if err != nil {
		return fmt.Errorf("cluster %s: destroy data object %q: %w", c.id, label, err)
	}
	return nil
}
