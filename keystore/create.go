package keystore

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"regexp"
	"time"

	"github.com/hsmbridge/hsmbridge/hsm"
	"github.com/hsmbridge/hsmbridge/keystore/store"
)

// CreateRequest is the body of "create dedicated keystore", as the caller sent it.
type CreateRequest struct {
	Alias        string
	HSMClusterID string
	ClusterID    string
	CACertPEM    string
	Type         string
}

// Created is what create answers.
type Created struct {
	KeystoreID string
	DomainID   string
}

var aliasRE = regexp.MustCompile(`^[a-zA-Z0-9:/_-]{1,255}$`)

// markerLabel is the label of the data object that binds a keystore to its token.
func markerLabel(keystoreID string) string { return "keystore:" + keystoreID }

// marker is the value of that object: the binding, as the store has it.
type marker struct {
	KeystoreID          string `json:"keystore_id"`
	DomainID            string `json:"domain_id"`
	ClusterID           string `json:"cluster_id"`
	TokenSerial         string `json:"token_serial"`
	TokenLabel          string `json:"token_label"`
	CAFingerprint       string `json:"ca_sha256"`
	IdentityFingerprint string `json:"identity_sha256"`
	CreatedAt           int64  `json:"created_at_ms"`
}

// CreateKeystore binds a new keystore to an unbound cluster whose identity the caller's CA
// vouches for and whose token proves it holds the identity key. The store row is written
// first (CREATING), so the database decides races on the alias and the cluster; then the
// marker goes on the token, then the row becomes DISABLED. Any failure undoes what was done.
func (s *Service) CreateKeystore(ctx context.Context, who Caller, req CreateRequest) (Created, error) {
	ksType, clusterID, err := validateCreate(req)
	if err != nil {
		return Created{}, err
	}
	cl, ok := s.clusters[clusterID]
	if !ok {
		return Created{}, newError(KindClusterUnknown, "HSM cluster %q does not exist", clusterID)
	}
	if cl.Type != ksType {
		return Created{}, newError(KindInvalidParameter, "HSM cluster %q is a %s cluster, not %s", clusterID, cl.Type, ksType)
	}
	now := s.now()
	ca, err := parseCACert(req.CACertPEM, now)
	if err != nil {
		return Created{}, err
	}
	identity := cl.IdentityCertificate()
	if identity == nil {
		return Created{}, newError(KindClusterUnknown, "HSM cluster %q has no identity configured", clusterID)
	}
	token := cl.Token()
	row := store.Keystore{
		ID: newID(), DomainID: who.DomainID, ProjectID: who.ProjectID,
		Alias: req.Alias, Type: ksType, ClusterID: clusterID, State: store.StateCreating,
		TokenSerial: token.Serial, TokenLabel: token.Label,
		CAFingerprint: fingerprint(ca.Raw), IdentityFingerprint: fingerprint(identity.Raw),
		CreatedAt: now, UpdatedAt: now,
	}
	if err := s.store.CreateKeystore(ctx, row); err != nil {
		switch {
		case errors.Is(err, store.ErrDuplicateAlias):
			return Created{}, newError(KindDuplicateAlias, "keystore alias %q already exists", req.Alias)
		case errors.Is(err, store.ErrClusterBound):
			return Created{}, newError(KindClusterBound, "HSM cluster %q is already bound to a keystore", clusterID)
		}
		return Created{}, storeError("create keystore", err)
	}
	if err := s.bind(ctx, cl, row, ca); err != nil {
		// Undo the claim on a context of its own: the request's may be what ended.
		undoCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if uerr := s.unbind(undoCtx, cl, row.ID); uerr != nil {
			s.log.Error("create keystore: undo failed; start-up repair will finish it",
				"keystore", row.ID, "cluster", clusterID, "err", uerr)
		}
		return Created{}, err
	}
	return Created{KeystoreID: row.ID, DomainID: row.DomainID}, nil
}

// bind runs the checks that need the HSM, writes the marker and enables the row's life.
func (s *Service) bind(ctx context.Context, cl Cluster, row store.Keystore, ca *caCert) error {
	if err := ca.issued(cl.IdentityCertificate(), row.CreatedAt); err != nil {
		return err
	}
	current, err := cl.CurrentToken(ctx)
	if err != nil {
		return &Error{Kind: KindClusterUnknown, Msg: "HSM cluster " + cl.ID() + " does not answer", Err: err}
	}
	if current.Serial != row.TokenSerial || current.Label != row.TokenLabel {
		return newError(KindClusterUnknown, "HSM cluster %s: the token in its slot is not the one it was opened on", cl.ID())
	}
	if err := cl.ProveIdentity(ctx); err != nil {
		if errors.Is(err, hsm.ErrIdentity) || errors.Is(err, hsm.ErrObjectNotFound) || errors.Is(err, hsm.ErrAmbiguous) {
			return &Error{Kind: KindCACertificate, Err: err,
				Msg: "hsm_ca_cert: the cluster's token could not prove possession of the key its identity certificate names"}
		}
		return hsmError("prove the cluster's identity", err)
	}
	value, err := json.Marshal(marker{
		KeystoreID: row.ID, DomainID: row.DomainID, ClusterID: row.ClusterID,
		TokenSerial: row.TokenSerial, TokenLabel: row.TokenLabel,
		CAFingerprint: row.CAFingerprint, IdentityFingerprint: row.IdentityFingerprint,
		CreatedAt: row.CreatedAt.UnixMilli(),
	})
	if err != nil {
		return &Error{Kind: KindInternal, Msg: "create keystore: encode marker", Err: err}
	}
	if err := cl.WriteData(ctx, markerLabel(row.ID), value); err != nil {
		return hsmError("write the keystore marker on the token", err)
	}
	if err := s.store.SetKeystoreState(ctx, row.ID, store.StateCreating, store.StateDisabled, s.now()); err != nil {
		return storeError("create keystore", err)
	}
	return nil
}

// unbind removes a keystore's row and then its marker. The row goes first so the database's
// foreign key can still refuse (a keystore with keys) before the token is touched; a crash
// between the two leaves a marker with no row, which start-up repair removes. Either may
// already be gone: it serves a failed create, a delete, and the repair of both.
func (s *Service) unbind(ctx context.Context, cl Cluster, id string) error {
	s.keystores.drop(id)
	err := s.store.DeleteKeystore(ctx, id)
	s.keystores.drop(id)
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return err
	}
	return cl.DestroyData(ctx, markerLabel(id))
}

// validateCreate checks the request's own fields and returns the keystore type and the
// cluster id it names.
func validateCreate(req CreateRequest) (ksType, clusterID string, err error) {
	if req.Alias == "" {
		return "", "", newError(KindMissingParameter, "keystore_alias is required")
	}
	if !aliasRE.MatchString(req.Alias) {
		return "", "", newError(KindInvalidParameter, "keystore_alias must match ^[a-zA-Z0-9:/_-]{1,255}$")
	}
	switch req.Type {
	case "", TypeDHSM, "1":
		ksType = TypeDHSM
	case TypeCDMS, "2":
		ksType = TypeCDMS
	case "DEFAULT", "0":
		return "", "", &Error{Kind: KindUnsupportedType, Msg: "keystore_type DEFAULT is not supported: this service serves dedicated HSM clusters only"}
	default:
		return "", "", newError(KindInvalidParameter, "keystore_type must be DHSM or CDMS")
	}
	switch {
	case req.HSMClusterID != "" && req.ClusterID != "" && req.HSMClusterID != req.ClusterID:
		return "", "", newError(KindInvalidParameter, "hsm_cluster_id and cluster_id name different clusters")
	case req.HSMClusterID != "":
		clusterID = req.HSMClusterID
	case req.ClusterID != "":
		clusterID = req.ClusterID
	default:
		return "", "", newError(KindMissingParameter, "hsm_cluster_id or cluster_id is required")
	}
	if req.CACertPEM == "" {
		return "", "", newError(KindMissingParameter, "hsm_ca_cert is required")
	}
	return ksType, clusterID, nil
}

func fingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}
